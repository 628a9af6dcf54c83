"""`uptrain push`: validation of the folder, the allow-list, the token rule, the upload through a test double
at the huggingface_hub boundary, Hub errors as one message each, and the real CLI (--dry-run, no token)."""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import filter_repo_objects
from hub_errors import http_error
from test_modelcard import folders  # noqa: F401  (the same converted + uptrained fixture folders)
from tiny_models import save, tiny_model

from uptrain.errors import UptrainError
from uptrain.publishing import push
from uptrain.publishing import hub, retries
from uptrain.publishing.allow_list import plan_upload
from uptrain.publishing.hub import DELETE_PATTERNS
from uptrain.publishing.retries import HUB_TRIES
from uptrain.publishing.model_card import front_matter
from uptrain.report import fmt_bytes

from repo_paths import REPO_PATH as ROOT
SECRET = "hf_testSECRETtoken123"
SHARDS = [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)]
UPLOADED = sorted(["README.md", "chat_template.jinja", "config.json", "generation_config.json", *SHARDS,
                   "model.safetensors.index.json", "plots/loss.png", "recipe.yaml", "tokenizer.json",
                   "tokenizer_config.json", "uptrain.json"])


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def copy_of(folder, tmp_path):
    import shutil

    return Path(shutil.copytree(folder, tmp_path / "copy"))


# ------------------------------------------------------------------------------------------- validation
def test_allow_list_leaves_training_leftovers_out(folders):
    _, uptrained, _ = folders
    p = plan_upload(uptrained, "me/x")
    assert p.files == UPLOADED
    assert dict(p.skipped) == {
        "checkpoint-10/": "training checkpoint", "checkpoints/": "training checkpoints",
        "logs/": "logs", "optimizer.pt": "optimizer state",
        "pytorch_model.bin": "pickled file (only safetensors weights are uploaded)", "train.log": "log",
        "plots/notes.txt": "not shown in the model card"}


@pytest.mark.parametrize("damage, message", [
    ("missing", r"1 of 6 shards named in model.safetensors.index.json are missing: model-00003-of-00006"),
    ("truncated", r"model-00003-of-00006.safetensors is truncated or corrupt"),
    ("remapped", r"model-00003-of-00006.safetensors does not match model.safetensors.index.json: missing from the "
                 r"shard: \w"),
    ("record", r"config.json has 2 KV heads but uptrain.json records a conversion to 4"),
    ("config", r"k_proj.weight has 16 rows but config.json's 4 KV heads × head_dim 8 need 32"),
    ("no config", r"has no config.json"),
])
def test_validation_catches_a_broken_folder(folders, tmp_path, damage, message):
    d = copy_of(folders[0], tmp_path)
    shard = d / SHARDS[2]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    if damage == "missing":
        shard.unlink()
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "remapped":  # the index sends a tensor of shard 1 to shard 3
        name = next(n for n, f in index["weight_map"].items() if f == SHARDS[0])
        index["weight_map"][name] = SHARDS[2]
        (d / "model.safetensors.index.json").write_text(json.dumps(index))
    elif damage == "record":
        rec = json.loads((d / "uptrain.json").read_text())
        rec["conversion"]["kv_heads_after"] = 4
        (d / "uptrain.json").write_text(json.dumps(rec))
    elif damage == "config":  # weights for 2 KV heads, config saying 4, no record to compare with
        cfg = json.loads((d / "config.json").read_text())
        cfg["num_key_value_heads"] = 4
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "uptrain.json").unlink()
    else:
        (d / "config.json").unlink()
    with pytest.raises(UptrainError, match=message):
        plan_upload(d, "me/x")


def test_single_file_checkpoint(tmp_path, tokenizer):
    d = save(tiny_model(kv_heads=2), tmp_path / "m", tokenizer)
    assert "model.safetensors" in plan_upload(d, "me/x").files


def test_a_card_the_user_wrote_is_kept_unless_asked(folders, tmp_path):
    d = copy_of(folders[1], tmp_path)
    mine = "---\nlicense: mit\n---\n# My model\n\n![curve](./plots/loss.png)\n"
    (d / "README.md").write_text(mine)
    kept = plan_upload(d, "me/x")
    assert kept.card == mine and kept.card_origin == "kept" and "plots/loss.png" in kept.files
    new = plan_upload(d, "me/x", overwrite_card=True)
    assert new.card_origin == "regenerated" and front_matter(new.card)["base_model"] == "acme/tiny-mha"
    (d / "README.md").write_text(new.card.replace("81.45", "1.00"))  # an old generated card: regenerated
    again = plan_upload(d, "me/x")
    assert again.card_origin == "generated" and again.card == new.card


# ------------------------------------------------------------------------------------------- the Hub boundary
class FakeHub:
    """Records every HfApi call uptrain makes; `fail` maps a method name to the exception it raises (always), or
    to a list of exceptions raised by its first calls (then it succeeds). The waits between retries are
    recorded in `waits`, not slept; `remote` is what list_repo_files answers."""

    def __init__(self, monkeypatch, repo_private=True, fail=None, remote=()):
        self.calls, self.uploaded, self.commits, self.waits = [], {}, [], []
        self.repo_private, self.fail, self.remote = repo_private, fail or {}, list(remote)
        for name in ("create_repo", "repo_info", "create_branch", "upload_folder", "create_commit", "upload_file",
                     "list_repo_files"):
            monkeypatch.setattr(huggingface_hub.HfApi, name, self._method(name))
        monkeypatch.setattr(retries, "_sleep", self.waits.append)

    def _method(self, name):
        real = inspect.signature(getattr(huggingface_hub.HfApi, name))

        def call(api, *args, **kw):
            real.bind(api, *args, **kw)  # the real method would accept these arguments
            self.calls.append((name, args, kw, api.token))
            fail = self.fail.get(name)
            if isinstance(fail, list) and fail:
                raise fail.pop(0)
            if isinstance(fail, BaseException):
                raise fail
            return getattr(self, name, lambda *a, **k: None)(api, *args, **kw)
        return call

    def create_repo(self, api, repo_id, **kw):
        return huggingface_hub.hf_api.RepoUrl(f"{api.endpoint}/{repo_id}", endpoint=api.endpoint)

    def repo_info(self, api, repo_id, **kw):
        return SimpleNamespace(private=self.repo_private)

    def upload_folder(self, api, *, folder_path, allow_patterns, **kw):
        root = Path(folder_path)
        everything = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        files = list(filter_repo_objects(everything, allow_patterns=allow_patterns))
        for f in files:
            self.uploaded[f] = (root / f).read_bytes()  # read now: the staging folder is temporary
        self.commits.append((kw["commit_message"], files, kw["delete_patterns"]))
        return SimpleNamespace(commit_url=f"{api.endpoint}/{kw['repo_id']}/commit/abc123")

    def list_repo_files(self, api, repo_id, **kw):
        return self.remote

    def names(self):
        return [c[0] for c in self.calls]


def test_without_a_token_nothing_is_called(folders, monkeypatch):
    hub = FakeHub(monkeypatch)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no saved login either
    with pytest.raises(UptrainError, match="no Hugging Face token: pass token, set HF_TOKEN, or log in"):
        push(folders[1], repo_id="me/x")
    assert hub.calls == []


def test_upload_goes_through_one_commit_of_the_allow_list(folders, monkeypatch):
    _, uptrained, eval_json = folders
    hub = FakeHub(monkeypatch, repo_private=True)
    before = snapshot(uptrained)
    result = push(uptrained, repo_id="me/tiny-gqa2", private=True, revision="gqa2", token=SECRET,
                  eval_json=eval_json, commit_message="GQA-2, uptrained")
    assert hub.names() == ["create_repo", "repo_info", "create_branch", "upload_folder"]
    (_, args, kw, tok), _, (_, _, bkw, _), (_, _, ukw, _) = hub.calls
    assert args == ("me/tiny-gqa2",) and kw == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert bkw == {"branch": "gqa2", "exist_ok": True}
    assert {c[3] for c in hub.calls} == {SECRET}  # the token given, nothing else
    assert ukw["repo_id"] == "me/tiny-gqa2" and ukw["revision"] == "gqa2"
    assert ukw["commit_message"] == "GQA-2, uptrained"
    assert ukw["delete_patterns"] == DELETE_PATTERNS
    assert sorted(hub.uploaded) == UPLOADED  # exactly the allow-list, one upload_folder = one commit
    assert hub.uploaded["README.md"].decode() == result.card and "81.45" in result.card
    for f in UPLOADED:
        if f != "README.md":
            assert hub.uploaded[f] == (uptrained / f).read_bytes(), f
    assert snapshot(uptrained) == before and not (uptrained / "README.md").exists()  # DIR untouched
    assert dict(result.files) == {f: len(b) for f, b in hub.uploaded.items()}
    endpoint = huggingface_hub.constants.ENDPOINT
    assert result.url == f"{endpoint}/me/tiny-gqa2/tree/gqa2"
    assert SECRET not in result.summary() and result.url in result.summary()


def test_public_push_to_main(folders, monkeypatch):
    hub = FakeHub(monkeypatch)
    result = push(folders[0], repo_id="me/tiny", token=SECRET)
    assert hub.names() == ["create_repo", "upload_folder"]  # no branch, no privacy check
    assert hub.calls[0][2]["private"] is None and hub.calls[1][2]["revision"] is None
    assert result.url.endswith("/me/tiny") and "tokenizer.json" in hub.uploaded


def test_private_push_refuses_an_existing_public_repo(folders, monkeypatch):
    hub = FakeHub(monkeypatch, repo_private=False)
    with pytest.raises(UptrainError, match="already exists and is public"):
        push(folders[0], repo_id="me/tiny", private=True, token=SECRET)
    assert "upload_folder" not in hub.names()


@pytest.mark.parametrize("method, make, message", [
    ("create_repo", lambda: http_error(hf_errors.HfHubHTTPError, 401, f"bad token {SECRET}"),
     "the Hub rejected the token (401 Unauthorized)"),
    ("create_repo", lambda: http_error(hf_errors.HfHubHTTPError, 403, "You don't have the rights"),
     "no write access to acme/tiny (403 Forbidden): the repo or the namespace 'acme' belongs to someone else"),
    ("upload_folder", lambda: http_error(hf_errors.HfHubHTTPError, 503), "server error (503)"),
    ("create_branch", lambda: http_error(hf_errors.RevisionNotFoundError, 404, "no such ref"),
     "branch 'gqa2' does not exist in acme/tiny and could not be created"),
    ("upload_folder", lambda: http_error(hf_errors.RepositoryNotFoundError, 404), "acme/tiny was not found on"),
    ("create_repo", lambda: importlib.import_module(hf_errors.Response.__module__.split(".")[0]).ConnectError("down"),
     "cannot reach"),
    ("create_repo", lambda: hf_errors.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE is set"),
])
def test_hub_errors_become_one_clear_message(folders, monkeypatch, method, make, message):
    FakeHub(monkeypatch, fail={method: make()})
    with pytest.raises(UptrainError, match=re.escape(message)) as e:
        push(folders[0], repo_id="acme/tiny", revision="gqa2", token=SECRET)
    assert SECRET not in str(e.value) and "\n" not in str(e.value)


def _connect_error():
    return importlib.import_module(hf_errors.Response.__module__.split(".")[0]).ConnectError("connection reset")


def test_transient_hub_errors_are_retried_with_backoff(folders, monkeypatch, capsys):
    """5xx, a dropped connection and 429 (with Retry-After) each cost one retry; the upload then goes through.
    With hf_xet, upload_folder called again resumes: committed files are skipped, uploaded chunks deduplicated."""
    limited = http_error(hf_errors.HfHubHTTPError, 429)
    limited.response.headers["Retry-After"] = "7"
    hub_ = FakeHub(monkeypatch, fail={"create_repo": [http_error(hf_errors.HfHubHTTPError, 502)],
                                      "upload_folder": [http_error(hf_errors.HfHubHTTPError, 503), _connect_error(),
                                                        limited]})
    result = push(folders[0], repo_id="me/tiny", token=SECRET)
    assert hub_.names() == ["create_repo"] * 2 + ["upload_folder"] * 4
    assert hub_.waits == [2.0, 2.0, 4.0, 7.0]  # per call: 2 s, then doubled; a 429's Retry-After wins
    assert len(hub_.commits) == 1 and result.url.endswith("/me/tiny")
    err = capsys.readouterr().err.splitlines()
    assert err == ["creating the repo: 502 from the Hub; trying again in 2 s (try 2 of 4)",
                   "uploading: 503 from the Hub; trying again in 2 s (try 2 of 4)",
                   "uploading: ConnectError from the Hub; trying again in 4 s (try 3 of 4)",
                   "uploading: 429 from the Hub; trying again in 7 s (try 4 of 4)"]


def test_retries_stop_after_hub_tries(folders, monkeypatch):
    hub_ = FakeHub(monkeypatch, fail={"upload_folder": http_error(hf_errors.HfHubHTTPError, 500)})
    with pytest.raises(UptrainError, match=re.escape(f"the Hub had a server error (500) after {HUB_TRIES} tries — try "
                                                     f"again later: a rerun resumes the upload")):
        push(folders[0], repo_id="me/tiny", token=SECRET)
    assert hub_.names().count("upload_folder") == HUB_TRIES == 4 and hub_.waits == [2.0, 4.0, 8.0]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 422])
def test_client_errors_are_never_retried(folders, monkeypatch, status):
    hub_ = FakeHub(monkeypatch, fail={"create_repo": http_error(hf_errors.HfHubHTTPError, status)})
    with pytest.raises(UptrainError):
        push(folders[0], repo_id="me/tiny", token=SECRET)
    assert hub_.names() == ["create_repo"] and hub_.waits == []


def test_a_large_folder_goes_up_weights_first_and_the_card_last(folders, monkeypatch):
    """Above LARGE_FOLDER_BYTES: the shards in a first upload (which huggingface_hub may split into several
    commits, and resumes when called again), then config, index, tokenizer and card in a final commit that also
    deletes the stale weights of the previous push (and never the new ones)."""
    _, uptrained, _ = folders
    monkeypatch.setattr(hub, "LARGE_FOLDER_BYTES", 1000)
    stale = ["model.safetensors", "model-00007-of-00007.safetensors"]
    hub_ = FakeHub(monkeypatch, remote=["README.md", "config.json", SHARDS[0], *stale, "notes.txt"])
    result = push(uptrained, repo_id="me/big", token=SECRET, commit_message="GQA-2")
    assert hub_.names() == ["create_repo", "upload_folder", "list_repo_files", "upload_folder"]
    (m1, files1, del1), (m2, files2, del2) = hub_.commits
    assert (m1, sorted(files1), del1) == ("GQA-2 (weights)", SHARDS, None)
    assert m2 == "GQA-2" and sorted(files2) == sorted(set(UPLOADED) - set(SHARDS))
    assert del2 == stale  # exact names: neither the new shards nor anything else
    assert sorted(hub_.uploaded) == UPLOADED and result.large
    assert "the weights first, then the rest with the card in a final commit" in result.summary()
    assert any(n.startswith("above 1000 B: the weights go up first") for n in result.notes)


def test_bad_repo_id(folders):
    with pytest.raises(UptrainError, match="is not a Hub repo id"):
        push(folders[0], repo_id="a/b/c", dry_run=True)


def test_bad_base_model_is_refused_before_anything(folders, monkeypatch):
    hub = FakeHub(monkeypatch)
    with pytest.raises(UptrainError, match=re.escape("base_model '../llama' is not a Hub repo id")) as e:
        push(folders[0], repo_id="me/tiny", token=SECRET, base_model="../llama")
    assert hub.calls == [] and "\n" not in str(e.value)


def test_base_model_is_committed_in_the_card(folders, monkeypatch):
    hub = FakeHub(monkeypatch)
    result = push(folders[0], repo_id="me/tiny", token=SECRET, base_model="meta-llama/Llama-2-7b-hf")
    assert front_matter(hub.uploaded["README.md"].decode())["base_model"] == "meta-llama/Llama-2-7b-hf"
    assert hub.calls[-1][2]["commit_message"] == "Upload GQA-2 conversion of meta-llama/Llama-2-7b-hf with uptrain"
    assert result.card == hub.uploaded["README.md"].decode()


def test_base_model_with_a_kept_user_card_says_so(folders, tmp_path):
    d = copy_of(folders[0], tmp_path)
    (d / "README.md").write_text("---\nlicense: mit\n---\n# My model\n")
    p = plan_upload(d, "me/x", base_model="meta-llama/Llama-2-7b-hf")
    assert p.card_origin == "kept" and "base_model" not in front_matter(p.card)
    assert any("base_model meta-llama/Llama-2-7b-hf is not used" in n for n in p.notes)


# ------------------------------------------------------------------------------------------- the real CLI
def cli(*args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN")}
    (tmp_path / "hf_home").mkdir(exist_ok=True)
    # An empty HF home (no saved login) and an endpoint nothing listens on: any Hub call would fail loudly.
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0",
               PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "uptrain", "push", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_dry_run_lists_files_and_card_and_uploads_nothing(folders, tmp_path):
    _, uptrained, eval_json = folders
    before = snapshot(uptrained)
    r = cli(uptrained, "--repo-id", "me/tiny-gqa2", "--dry-run", "--private", "--eval-json", eval_json,
            tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    head, card = r.stdout.split("model card (README.md, generated from uptrain.json):\n\n")
    assert head.startswith(f"dry run: nothing uploaded. Would push {len(UPLOADED)} files")
    assert "to me/tiny-gqa2, private:" in head
    for f in UPLOADED:
        if f != "README.md":
            size = fmt_bytes((uptrained / f).stat().st_size)
            assert any(line.split() == [f, *size.split()] for line in head.splitlines()), (f, size)
    assert "  optimizer.pt  — optimizer state" in head and "  checkpoint-10/  — training checkpoint" in head
    assert "note: no token found" in head
    meta = front_matter(card)
    assert meta["base_model"] == "acme/tiny-mha" and "gqa" in meta["tags"] and "| **this model**" in card
    assert snapshot(uptrained) == before


def test_cli_without_a_token_fails_before_anything(folders, tmp_path):
    r = cli(folders[0], "--repo-id", "me/tiny", tmp_path=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "uptrain push: error: no Hugging Face token: pass --token, set HF_TOKEN, or log in once with "
        "`hf auth login` (the token needs write access). Nothing was created or uploaded"]


def test_cli_base_model_dry_run_in_process(folders, tmp_path, capsys):
    """--base-model on the CLI: the dry run's card names it; an invalid one is one line on stderr."""
    from uptrain.cli import main

    converted = folders[0]
    before = snapshot(converted)
    assert main(["push", str(converted), "--repo-id", "me/llama-gqa2", "--dry-run",
                 "--base-model", "meta-llama/Llama-2-7b-hf"]) == 0
    out, _ = capsys.readouterr()
    card = out.split("model card (README.md, generated from uptrain.json):\n\n")[1]
    meta = huggingface_hub.ModelCard(card).data
    assert meta.base_model == "meta-llama/Llama-2-7b-hf" and meta.base_model_relation == "finetune"
    assert main(["push", str(converted), "--repo-id", "me/x", "--dry-run", "--base-model", "a/b/c"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "--base-model 'a/b/c' is not a Hub repo id" in err
    assert snapshot(converted) == before


def test_cli_bad_folder_in_process(folders, tmp_path, capsys):
    """The same entry point, called in-process (a third subprocess would cost seconds of imports)."""
    from uptrain.cli import main

    d = copy_of(folders[0], tmp_path)
    (d / SHARDS[0]).unlink()
    assert main(["push", str(d), "--repo-id", "me/tiny", "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert "shards named in model.safetensors.index.json are missing: model-00001-of-00006" in err


def test_push_options_speak_the_callers_words(folders):
    """One PushOptions for the CLI and the API: an unknown keyword is refused with the nearest name, options= and
    keywords together are refused, and the same mistake reads as a flag on the command line."""
    with pytest.raises(UptrainError, match=re.escape("unknown push option dryrun; did you mean dry_run?")):
        push(folders[0], repo_id="me/x", dryrun=True)
    with pytest.raises(UptrainError, match="options= or keyword options, not both"):
        push(folders[0], repo_id="me/x", options=hub.PushOptions(repo_id="me/x"))
    with pytest.raises(UptrainError, match=re.escape("repo_id is required")):
        push(folders[0], dry_run=True)
    with pytest.raises(UptrainError, match=re.escape("eval_json /nonexistent.json: cannot read it")):
        push(folders[0], repo_id="me/x", dry_run=True, eval_json="/nonexistent.json")
    from uptrain.cli import main

    assert main(["push", str(folders[0]), "--repo-id", "me/x", "--dry-run", "--eval-json", "/nonexistent.json"]) == 2

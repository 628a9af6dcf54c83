"""`uptrain push`: validate a checkpoint folder, write its model card, upload it to the Hub in one commit
(a folder above LARGE_FOLDER_BYTES: the weights first, then the rest with the card in a final commit).

What is uploaded: allow_list.py (after validation.py's checks); Hub errors: failures.py; retries: retries.py.

DIR itself is never modified. The upload is staged in a temporary folder holding links to DIR's files
plus the card, and that folder is what `upload_folder` sees. Writing README.md into DIR instead would
turn our card into "a card the user wrote" on the next push, and a push that changes its input is a
surprise; the staging folder costs a few symlinks, not copies.

Transient Hub failures are retried (retries.py). huggingface_hub 2.x has no `upload_large_folder`: with hf_xet
installed `upload_folder` itself streams, batches big uploads into several commits and resumes an interrupted one
when called again (already committed files are skipped, uploaded chunks deduplicated), so a retry is a resume. Above
LARGE_FOLDER_BYTES, where one commit stops being a good bet (hours of upload, the pipeline's own batching by
file count and time), the weights go up first and config, index, tokenizer and the card last, with the
deletion of stale weights: the repo switches to the new model in that final commit and its card never
describes weights that are not there yet.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from uptrain.arch import attention_kind
from uptrain.errors import UptrainError
from uptrain.hf import hub_token
from uptrain.publishing.allow_list import plan_upload
from uptrain.publishing.card_facts import source_name
from uptrain.publishing.failures import hub_errors
from uptrain.publishing.options import PushOptions
from uptrain.publishing.retries import with_retries
from uptrain.record import try_read_record
from uptrain.report import fmt_bytes

# A push replaces the model: weights a previous push left on the branch must go in the same commit, or a
# stale index (or stale shards) would be loaded instead of the new single file.
DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
LARGE_FOLDER_BYTES = 10 << 30  # 10 GiB: above it, weights first and the card last (module docstring)


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repo, bytes), in upload order
    skipped: list[tuple[str, str]]  # (path in DIR, why it is not uploaded)
    card: str
    card_origin: str  # "generated" | "kept" | "regenerated"
    private: bool = False
    revision: str | None = None
    dry_run: bool = False
    url: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)
    large: bool = False  # above LARGE_FOLDER_BYTES: weights first, then the rest in a final commit

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    def listing(self) -> str:
        width = max(len(f) for f, _ in self.files)
        lines = [f"  {f:<{width}}  {fmt_bytes(n):>10}" for f, n in self.files]
        if self.skipped:
            lines.append("left out:")
            lines += [f"  {f}  — {why}" for f, why in self.skipped]
        return "\n".join(lines)

    def summary(self) -> str:
        where = (self.repo_id + (f" (branch {self.revision})" if self.revision else "")
                 + (", private" if self.private else ""))
        card = {"generated": "generated from uptrain.json", "kept": "your README.md, kept",
                "regenerated": "generated, replacing your README.md (--overwrite-card)"}[self.card_origin]
        notes = "".join(f"note: {n}\n" for n in self.notes)
        if self.dry_run:
            return (f"dry run: nothing uploaded. Would push {len(self.files)} files "
                    f"({fmt_bytes(self.total_bytes)}) to {where}:\n{self.listing()}\n{notes}"
                    f"model card (README.md, {card}):\n\n{self.card}")
        how = "the weights first, then the rest with the card in a final commit" if self.large else "in one commit"
        return (f"pushed {len(self.files)} files ({fmt_bytes(self.total_bytes)}) to {where}, {how}; "
                f"model card: {card}\n{self.listing()}\n{notes}{self.url}")


def resolve_token(token: str | None = None, key: str = "token") -> str:
    """The token option, else HF_TOKEN, else the saved login (uptrain.hf.hub_token, which training checks too).
    Never printed. key: how the caller names the option (--token, token)."""
    token = hub_token(token)
    if not token:
        raise UptrainError(f"no Hugging Face token: pass {key}, set HF_TOKEN, or log in once with "
                           f"`hf auth login` (the token needs write access). Nothing was created or uploaded")
    return token



@contextmanager
def staged(folder: Path, files: list[str], card: str):
    """A temporary folder holding exactly `files` (links to DIR's) with README.md = `card`."""
    with tempfile.TemporaryDirectory(prefix="uptrain-push-") as tmp:
        for name in files:
            dst = Path(tmp) / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name == "README.md":
                dst.write_text(card, encoding="utf-8")
                continue
            try:
                os.symlink((folder / name).resolve(), dst)
            except OSError:  # no symlinks (some Windows setups): copy
                shutil.copy2(folder / name, dst)
        yield tmp


def _pattern(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (allow_patterns are globs)."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _default_message(folder: Path, base_model: str | None = None) -> str:
    rec = try_read_record(folder)
    if rec is None:
        return "Upload model with uptrain"
    conv = rec.conversion
    src = base_model or (source_name(conv) if conv else None)
    kind = attention_kind(conv.num_attention_heads, conv.kv_heads_after) if conv else "?"
    what = f"{kind} conversion of {src}" if kind != "?" else "model"
    return f"Upload {what}" + (" (uptrained)" if rec.uptraining else "") + " with uptrain"


def push(dir, repo_id: str | None = None, *, options: PushOptions | None = None, **kwargs) -> PushResult:
    """Validate DIR, write its model card, and upload the allow-listed files to `repo_id` in one commit.

    Options are the fields of PushOptions (uptrain/publishing/options.py), given as keyword arguments
    (`push(folder, "me/x", dry_run=True)`) or as one `options=` object, never both; they are the flags of
    `uptrain push`. base_model: the Hub model this one derives from (e.g. the Hub id of a local source copy),
    written as the card's `base_model` instead of what uptrain.json suggests."""
    if options is not None and (kwargs or repo_id is not None):
        raise UptrainError(f"push() takes options= or keyword options, not both "
                           f"(got {', '.join(['repo_id'] * (repo_id is not None) + list(kwargs))})")
    o = (options or PushOptions.from_kwargs("python", repo_id=repo_id, **kwargs)).check()
    repo_id, private, revision, token = o.repo_id, o.private, o.revision, o.token
    assert repo_id is not None  # check() refuses a missing one
    if not o.dry_run:  # cheap checks first: no token, no need to wait for the folder's validation
        token = resolve_token(token, o.key("token"))
    folder = Path(dir)
    p = plan_upload(folder, repo_id, eval_json=o.eval_json, overwrite_card=o.overwrite_card,
                    base_model=o.base_model, said=o)
    sizes = [(f, len(p.card.encode()) if f == "README.md" else (folder / f).stat().st_size) for f in p.files]
    result = PushResult(repo_id=repo_id, files=sizes, skipped=p.skipped, card=p.card, card_origin=p.card_origin,
                        private=private, revision=revision, dry_run=o.dry_run, notes=p.notes,
                        large=sum(n for _, n in sizes) > LARGE_FOLDER_BYTES)
    if result.large:
        result.notes.append(f"above {fmt_bytes(LARGE_FOLDER_BYTES)}: the weights go up first, the rest and the card "
                            f"in a final commit" + ("" if importlib.util.find_spec("hf_xet") else
                                                    "; install hf_xet (pip install hf_xet) for an upload that "
                                                    "resumes where it stopped instead of starting again"))
    if o.dry_run:
        from huggingface_hub import get_token

        if not (token or get_token()):
            result.notes.append(f"no token found: a real push needs {o.key('token')}, HF_TOKEN or `hf auth login`")
        return result

    from huggingface_hub import HfApi

    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, read by huggingface_hub itself
    message = o.commit_message or _default_message(folder, o.base_model)
    with hub_errors(repo_id, revision, api.endpoint, token, o):
        # private=None for a public push keeps an organisation's "private by default" policy.
        repo_url = with_retries(lambda: api.create_repo(repo_id, private=private or None, exist_ok=True,
                                                        repo_type="model"), "creating the repo")
        if private and not with_retries(lambda: api.repo_info(repo_id), "reading the repo").private:
            raise UptrainError(f"{repo_id} already exists and is public; {o.key('private')} does not change an "
                               f"existing repo. Make it private in its settings first, or drop {o.key('private')}")
        if revision and not revision.startswith("refs/"):
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "creating the branch")
        with staged(folder, p.files, p.card) as tmp:
            def upload(files, delete, msg):
                return with_retries(lambda: api.upload_folder(
                    repo_id=repo_id, folder_path=tmp, allow_patterns=[_pattern(f) for f in files],
                    delete_patterns=delete, revision=revision, commit_message=msg), "uploading")

            if result.large:
                weights = [f for f in p.files if f.endswith(".safetensors")]
                upload(weights, None, f"{message} (weights)")
                remote = with_retries(lambda: api.list_repo_files(repo_id, revision=revision), "listing the repo")
                stale = [f for f in remote if f not in p.files
                         and any(fnmatch.fnmatch(f, pat) for pat in DELETE_PATTERNS)]
                info = upload([f for f in p.files if f not in weights], [_pattern(f) for f in stale] or None, message)
            else:
                info = upload(p.files, DELETE_PATTERNS, message)
    result.url = str(repo_url).rstrip("/") + (f"/tree/{revision}" if revision else "")
    result.commit_url = getattr(info, "commit_url", None)
    return result

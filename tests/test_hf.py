"""hf.py: one answer to "is this a Hub id?", one resolver, one set of loading errors (no network)."""
import pytest
from tiny_models import save, tiny_model

from uptrain.errors import UptrainError
from uptrain.hf import card_licence, check_hub_id, is_hub_id, load_config, load_tokenizer, resolve, snapshot_repo


@pytest.mark.parametrize("name, hub", [
    ("meta-llama/Llama-2-7b-hf", True), ("gpt2", True), ("./local", False), ("/abs/path", False),
    ("~/x", False), ("a/b/c", False), ("bad--name/x", False), ("a/..b", False), ("", False), (None, False),
])
def test_is_hub_id(name, hub):
    assert is_hub_id(name) is hub


def test_an_existing_folder_is_never_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()
    assert not is_hub_id("gpt2")
    with pytest.raises(UptrainError, match="--repo-id 'a/b/c' is not a Hub repo id"):
        check_hub_id("a/b/c", "--repo-id")


def test_snapshot_folders_name_their_repo(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "hub" / "models--meta-llama--Llama-2-7b-hf" / "snapshots" / commit
    snap.mkdir(parents=True)
    assert snapshot_repo(snap) == ("meta-llama/Llama-2-7b-hf", commit)
    src = resolve(str(snap))
    assert src.local and src.hub_id == "meta-llama/Llama-2-7b-hf" and src.revision == commit
    assert snapshot_repo(tmp_path) is None


def test_resolve_and_load_errors_name_the_input(tmp_path, tokenizer):
    with pytest.raises(UptrainError, match=r"^model.path '/no/where' not found: not a folder, nor a Hub repo id$"):
        resolve("/no/where", what="model.path")
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UptrainError, match="is a file; give the checkpoint folder"):
        resolve(str(tmp_path / "f.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UptrainError, match="distill.teacher .* has no config.json"):
        load_config(resolve(str(tmp_path / "empty"), what="distill.teacher"))
    bare = save(tiny_model(), tmp_path / "bare")  # weights and config, no tokenizer
    assert load_config(resolve(bare), causal=True).model_type == "llama"
    with pytest.raises(UptrainError, match="no usable tokenizer in model .*: pass --tokenizer"):
        load_tokenizer(resolve(bare), why="pass --tokenizer")


def test_card_licence(tmp_path):
    assert card_licence(tmp_path) == {}
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: llama2\ntags: [x]\n---\n# card\n")
    assert card_licence(tmp_path) == {"license": "other", "license_name": "llama2"}
    (tmp_path / "README.md").write_text("# a card without front matter\n")
    assert card_licence(tmp_path) == {}

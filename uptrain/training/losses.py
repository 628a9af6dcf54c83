"""The terms of an uptraining step's loss, summed over a micro-batch's target positions (the loop normalises by
the target tokens of the whole accumulation window):

    loss = ce_weight · CE + weight · T² · KL(teacher ‖ student) + hidden_weight · H

H, the hidden-state term, compares every decoder layer's output with the teacher's at the same position, as a
relative squared error per token, averaged over the layers: after a conversion only the attention changed, and
each layer's residual stream says where it went wrong, where the logits say so only at the end of the stack.
Per token and relative, so the few tokens whose hidden states are 100× the rest (attention sinks) weigh no more
than any other."""
from __future__ import annotations

from typing import Sequence


def token_losses(model, teacher, inputs: dict, labels, temperature: float, autocast, hidden: bool = False):
    """(CE, KL, H) summed over the targets `labels` [b, l] of the model's output on `inputs` (-100: no target; an
    objective's `batch` makes both, see objectives.py). KL: T²·KL(teacher ‖ student) over the same positions, None
    without a teacher; H (`hidden` and a teacher): hidden_error over them, else None. For an encoder-decoder the
    positions are the decoder's targets, and H compares the decoder's layers."""
    import torch
    import torch.nn.functional as F

    hidden = hidden and teacher is not None
    extra = {"output_hidden_states": True} if hidden else {}
    out = model(**inputs, use_cache=False, **extra)
    logits = out.logits
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    if teacher is None:
        return ce, None, None
    with torch.no_grad(), autocast():
        t_out = teacher(**inputs, use_cache=False, **extra)
    t, targets = temperature, labels != -100
    s_logp = F.log_softmax(logits[targets].float() / t, dim=-1)
    t_logp = F.log_softmax(t_out.logits[targets].float() / t, dim=-1)
    kl = F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * (t * t)
    h = hidden_error(layer_outputs(out), layer_outputs(t_out), targets) if hidden else None
    return ce, kl, h


def weighted(distill, ce, kl, hidden):
    """The loss a step backpropagates: ce_weight · CE + weight · KL + hidden_weight · H (`distill`: the recipe's
    distill section); CE alone without a teacher."""
    if kl is None:
        return ce
    total = distill.ce_weight * ce + distill.weight * kl
    return total if hidden is None else total + distill.hidden_weight * hidden


def layer_outputs(out) -> Sequence:
    """The hidden states that line up with the logits, one per decoder layer: a decoder-only model's, an
    encoder-decoder's decoder's (the embeddings, index 0, are the teacher's already)."""
    states = getattr(out, "decoder_hidden_states", None) or out.hidden_states
    return states[1:]


def hidden_error(student: Sequence, teacher: Sequence, mask):
    """Σ over the positions `mask` [b, l] of the mean over layers of ‖h − h_teacher‖² / ‖h_teacher‖², float32;
    student and teacher: one [b, l, d] tensor per layer."""
    if len(student) != len(teacher) or not student:  # a bug guard: check_teacher refuses another stack
        raise ValueError(f"{len(student)} student layers against {len(teacher)} teacher layers")
    total = 0
    for s, t in zip(student, teacher):
        s, t = s[mask].float(), t[mask].float()
        total = total + ((s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)).sum()
    return total / len(student)

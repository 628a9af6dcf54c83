"""eval.keep_best: uptraining never leaves a model worse than it started. The loop judges held-out loss at step 0
(before any update) and at every eval.every; the state of the lowest loss so far is kept, and when the last step
ends above it, that state is what the run saves (the start itself, bit for bit, when no evaluation beat it).

Where the best state lives: one copy of the trainable weights in CPU memory on the main process (gathered from
FSDP / ZeRO-3 shards), never a second copy on a GPU. A checkpoint carries its (step, loss) in trainer_state.json
and, when it is neither the start nor the checkpoint's own state, its weights as best_state.safetensors, so a
resumed run judges exactly as an uninterrupted one: the start is the model loaded before the checkpoint's state.
Every rank takes the same decision (held-out loss is reduced across ranks, and each decision is agreed once more).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from uptrain.training.run_folder import any_rank

BEST_FILE = "best_state.safetensors"


class BestState:
    def __init__(self, acc, enabled: bool):
        self.acc, self.enabled = acc, enabled
        self.step: int | None = None  # None: nothing judged yet
        self.loss = math.inf
        self.eval: dict | None = None
        self.tensors: dict[str, Any] | None = None  # main process: CPU copies of the trainable weights

    def offer(self, model, ev: dict) -> None:
        """After a held-out evaluation during the run (step 0 included): keep this state when it is the best."""
        if self.enabled and any_rank(self.acc, ev["loss"] < self.loss):
            self.capture(model, ev["step"], ev["loss"], ev)

    def capture(self, model, step: int, loss: float, ev: dict | None) -> None:
        """Copy the trainable weights to CPU (every rank calls it: FSDP and ZeRO-3 gather them)."""
        acc = self.acc
        state = acc.get_state_dict(model)
        if acc.is_main_process:
            names = {n for n, p in acc.unwrap_model(model).named_parameters(remove_duplicate=False)
                     if p.requires_grad}
            self.tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items() if k in names}
        self.step, self.loss, self.eval = step, loss, ev
        acc.wait_for_everyone()

    # -- checkpoints and resume -----------------------------------------------------------------------
    def state(self) -> dict | None:
        return {"step": self.step, "loss": self.loss, "eval": self.eval} if self.enabled and self.step is not None \
            else None

    def tensors_for(self, step: int) -> dict | None:
        """What a checkpoint of `step` must carry besides the state: the best weights when they are neither the
        start (reloaded from model.path) nor the checkpoint's own."""
        return self.tensors if self.enabled and self.step not in (None, 0, step) else None

    def before_resume(self, model, saved: dict | None) -> None:
        """Called with the model as loaded from model.path (the start), before the checkpoint's state goes in."""
        if self.enabled and saved and saved["step"] == 0:
            self.capture(model, 0, saved["loss"], saved.get("eval"))

    def after_resume(self, model, saved: dict | None, ckpt: Path, start: int) -> None:
        """Called once the checkpoint of step `start` is loaded."""
        if not self.enabled or (saved and saved["step"] == 0):
            return
        if not saved or saved["step"] == start:  # (no record: a checkpoint of a run before keep_best)
            self.capture(model, start, saved["loss"] if saved else math.inf, saved.get("eval") if saved else None)
            return
        if self.acc.is_main_process:
            from safetensors.torch import load_file

            self.tensors = load_file(str(ckpt / BEST_FILE))
        self.step, self.loss, self.eval = saved["step"], saved["loss"], saved.get("eval")

    # -- the end --------------------------------------------------------------------------------------
    def verdict(self, final: dict) -> str | None:
        """After the last step's evaluation: None when the last state is kept, else the one-line message; then
        `self.tensors` (main process) are the weights to save and `self.eval` their evaluation."""
        worse = not final["loss"] <= self.loss  # (a NaN is worse)
        if not self.enabled or self.step is None or not any_rank(self.acc, worse):
            return None
        if self.step == 0:
            return (f"keep_best: the held-out loss never went below the start's ({self.loss:.4f} at step 0, "
                    f"{final['loss']:.4f} after step {final['step']}): the saved model is the one the run started "
                    f"from, unchanged")
        return (f"keep_best: the held-out loss was lowest after step {self.step} ({self.loss:.4f}; "
                f"{final['loss']:.4f} after step {final['step']}): the saved model is the state after step "
                f"{self.step}")

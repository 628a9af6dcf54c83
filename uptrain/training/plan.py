"""`uptrain plan RECIPE.yaml`: what a recipe costs before anyone rents GPUs. Parameters (after the recipe's
conversion), the budget's steps and tokens, training FLOPs, memory per GPU for DDP / FSDP / ZeRO-3 and
GPU-hours on named accelerators. Arithmetic on a config: the model is built on the meta device, no weight
is read, so a 70B recipe plans in seconds on a laptop.

    p = plan("recipes/llama2-7b-gqa8.yaml", accelerate_config="recipes/accelerate/fsdp.yaml")
    print(p.to_text()); p.to_dict()

The formulas (each a small function below, tested by hand in tests/training/test_plan.py):
- FLOPs = (4·N + 2·N_train) · tokens: forward 2N, backward 2N for the activation gradients plus 2N_train
  for the weight gradients; 6·N·tokens when every parameter trains. Attention scores are left out (as in
  Kaplan et al.'s C = 6ND); activation checkpointing re-runs the forward (8·N on the hardware), which
  model-FLOPs utilisation (MFU) does not count.
- Memory per GPU = weights + gradients + optimiser state (AdamW: two moments) + activations + working copies.
  DDP replicates the first three; FSDP and ZeRO-3 divide them by the number of processes.
- Activations follow Korthikanti et al. 2022 (*Reducing Activation Recomputation in Large Transformer
  Models*, Eq. 2) with the model's own widths. Per token and decoder layer, in the compute dtype (a bytes:
  2 under bf16/fp16, 4 in float32): 3h + 2h_kv for attention (the inputs of the QKV and output projections,
  Q, K and V; SDPA / flash attention store no s×s matrix, and there is no dropout) and h + 4i for a gated MLP
  (h + 2i ungated); plus 16h bytes for the two RMSNorms, which compute in float32 and each keep their input
  and output. For a classic MHA layer with a 4h GeLU MLP and 16-bit norms this is the paper's 34·s·b·h
  bytes less its two dropout masks and the 5·a·s²·b attention term. With activation checkpointing only each
  layer's input stays (the residual stream, in the weights' dtype: float32 weights under autocast keep a
  float32 residual), plus one layer recomputed in the backward. The loss adds 10·s·b·V bytes in 16-bit (the
  logits, their float32 copy and the float32 log-softmax the backward needs; 8·s·b·V in float32). Measured
  against the tensors autograd saves (tests/training/test_plan.py), this is within a few per cent in float32 and up to
  ~30% above in bf16, the difference being transient logits.
- DDP with 16-bit autocast over float32 weights also holds a 16-bit copy of every weight during the forward
  (autocast's cast cache); FSDP / ZeRO-3 hold two gathered units (a decoder layer or the embedding) instead.
"""
from __future__ import annotations

import math
import os
from typing import Any
from dataclasses import asdict, dataclass, field

from uptrain.errors import UptrainError
from uptrain.training.budget import resolve_budget
from uptrain.training.recipe import Recipe, load_recipe, params_text, read_yaml

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    bf16_flops: float  # dense bf16 peak, FLOP/s (without 2:4 sparsity)
    memory_gib: float


# NVIDIA data sheets, SXM parts.
ACCELERATORS = (
    Accelerator("A100 80GB", 312e12, 80),
    Accelerator("H100", 989e12, 80),
    Accelerator("H200", 989e12, 141),
)
DEFAULT_MFU = 0.40  # an assumption, printed with every result (--mfu sets another)


# Which of (weights, gradients, optimiser state) each strategy divides over the processes.
SHARDS = {"DDP": (), "ZeRO-1": ("optimiser",), "ZeRO-2": ("gradients", "optimiser"),
          "FSDP": ("weights", "gradients", "optimiser"), "ZeRO-3": ("weights", "gradients", "optimiser")}
SHOWN = ("DDP", "FSDP", "ZeRO-3")
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NORMS = 4  # float32 values per hidden unit and token a layer's two RMSNorms keep: each its input and output


# ------------------------------------------------------------------------------------------ formulas
def training_flops(n: int, n_train: int, tokens: int) -> float:
    """Forward 2N, backward 2N (activation gradients) + 2N_train (weight gradients), per token."""
    return float(4 * n + 2 * n_train) * tokens


def layer_bytes(hidden: int, kv_width: int, intermediate: int, gated: bool, act_bytes: int,
                experts_per_token: int = 1, shared_intermediate: int = 0) -> int:
    """Bytes one decoder layer keeps for the backward, per token (the module docstring says what)."""
    attention = 3 * hidden + 2 * kv_width
    mlp = experts_per_token * (hidden + (4 if gated else 2) * intermediate)
    if shared_intermediate:
        mlp += hidden + 4 * shared_intermediate
    return act_bytes * (attention + mlp) + NORMS * 4 * hidden


def activation_bytes(layers: int, per_layer: int, hidden: int, vocab: int, tokens: int, act_bytes: int,
                     residual_bytes: int, checkpointing: bool) -> int:
    """Activations of one micro-batch of `tokens` = micro_batch_size × seq_len tokens, at their peak."""
    body = layers * hidden * residual_bytes * tokens + per_layer * tokens if checkpointing \
        else layers * per_layer * tokens
    loss = (act_bytes + (4 if act_bytes < 4 else 0) + 4) * tokens * vocab
    return body + loss


@dataclass
class Memory:
    """Bytes per GPU of one strategy."""

    strategy: str
    weights: int
    gradients: int
    optimiser: int
    activations: int
    working: int  # FSDP / ZeRO-3: gathered layers; DDP: 16-bit autocast copies of 32-bit weights

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimiser + self.activations + self.working


def state_bytes(strategy: str, n: int, n_train: int, weight_bytes: int, mixed: bool, world: int) -> dict:
    """Weights, gradients and AdamW state per GPU. torch (DDP, FSDP) keeps them in the weights' dtype (FSDP2
    under mixed precision upcasts trainable weights to float32: accelerate's fsdp2_prepare_model);
    DeepSpeed under 16-bit mixed precision holds 16-bit weights and gradients and a float32 master copy
    beside the two moments (the ZeRO paper's 2 + 2 + 12 bytes per parameter)."""
    if strategy.startswith("ZeRO") and mixed:
        per = {"weights": 2 * n, "gradients": 2 * n_train, "optimiser": 12 * n_train}
    else:
        w = 4 if strategy == "FSDP" and mixed else weight_bytes
        per = {"weights": w * n_train + weight_bytes * (n - n_train), "gradients": w * n_train,
               "optimiser": 2 * w * n_train}
    return {k: math.ceil(v / world) if k in SHARDS[strategy] else v for k, v in per.items()}


def gpu_hours(flops: float, peak: float, mfu: float) -> float:
    return flops / (peak * mfu) / 3600


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class TrainingPlan:
    recipe: str
    model: str
    model_type: str
    layers: int
    heads: int
    kv_heads_before: int | str  # a per-layer count as its text ("2,1,1,2")
    kv_heads: int | str
    parameters_before: int  # the source, before the recipe's conversion
    parameters: int
    trainable: int
    params: str  # train.params
    processes: int
    micro_batch_size: int
    grad_accum: int
    seq_len: int
    tokens_per_step: int
    steps: int
    tokens: int
    budget: str
    flops: float
    mixed_precision: str
    weights_dtype: str
    activation_checkpointing: bool
    strategy: str | None  # the accelerate config's, when given
    memory: list[Memory]
    mfu: float
    accelerators: list[dict]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        for m, row in zip(self.memory, d["memory"]):
            row["total"] = m.total
        return d

    def to_text(self) -> str:
        conv = (f" → {self.kv_heads} KV heads" if self.kv_heads != self.kv_heads_before else "")
        lines = [
            f"uptrain plan: {self.recipe}",
            f"model        {self.model} ({self.model_type}, {self.layers} layers, {self.heads} heads, "
            f"{self.kv_heads_before} KV heads{conv})",
            f"parameters   {self.parameters:,} ({self.parameters / 1e9:.2f}B)"
            + (f", {self.parameters_before:,} before the conversion" if self.parameters != self.parameters_before
               else ""),
            f"trainable    {self.trainable:,} (train.params: {self.params})",
            f"budget       {self.budget}",
            f"             {self.processes} process(es) × micro-batch {self.micro_batch_size} × accumulation "
            f"{self.grad_accum} × seq_len {self.seq_len}",
            f"compute      {sci(self.flops)} FLOP  "
            + ("(6·N·tokens)" if self.trainable == self.parameters else
               "((4·N + 2·N_train)·tokens: frozen weights get no gradient)"),
            "",
            f"memory per GPU, {self.processes} process(es): {self.weights_dtype} weights, mixed precision "
            f"{self.mixed_precision}, AdamW, activation checkpointing "
            f"{'on' if self.activation_checkpointing else 'off'}",
            f"  {'strategy':<8} {'weights':>10} {'gradients':>10} {'optimiser':>10} {'activations':>12} "
            f"{'working':>10} {'total':>10}",
        ]
        for m in self.memory:
            mark = "  ← accelerate config" if m.strategy == self.strategy else ""
            lines.append(f"  {m.strategy:<8} " + " ".join(
                f"{_gib(v):>{w}}" for v, w in ((m.weights, 10), (m.gradients, 10), (m.optimiser, 10),
                                               (m.activations, 12), (m.working, 10), (m.total, 10))) + mark)
        lines += ["", f"time at {self.mfu:.0%} MFU (bf16 dense peak), {self.processes} GPU(s):"]
        for a in self.accelerators:
            fits = ", ".join(a["fits"]) or "none"
            lines.append(f"  {a['name']:<10} {a['bf16_tflops']:>5.0f} TFLOP/s  {a['gpu_hours']:>10,.0f} GPU-hours  "
                         f"{a['wall_hours']:>8,.1f} h wall-clock  fits ({a['memory_gib']:g} GiB): {fits}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def plan(recipe, overrides: list[str] | None = None, *, accelerate_config: str | None = None,
         processes: int | None = None, mfu: float = DEFAULT_MFU) -> TrainingPlan:
    """The cost of a recipe. processes: GPUs (default: the accelerate config's num_processes × num_machines,
    else 1); accelerate_config: the launcher YAML (its distributed_type marks the strategy, its
    mixed_precision applies when the recipe leaves train.mixed_precision unset)."""
    r = load_recipe(recipe, overrides)
    launcher = read_launcher(accelerate_config) if accelerate_config else {}
    world = processes or launcher.get("processes") or 1
    if world < 1:
        raise UptrainError(f"processes must be at least 1, got {world}")
    if not 0 < mfu <= 1:
        raise UptrainError(f"mfu must be in (0, 1], e.g. 0.4; got {mfu}")
    mixed = r.train.mixed_precision or launcher.get("mixed_precision") or "no"
    tps = r.train.micro_batch_size * r.train.grad_accum * world * r.data.seq_len
    budget = resolve_budget(r.budget, tps)

    shape = model_shape(r)
    n, n_train = shape["parameters"], shape["trainable"]
    flops = training_flops(n, n_train, budget.steps * tps)
    weight_bytes = BYTES[r.model.dtype]
    act_bytes = 2 if mixed in ("bf16", "fp16") or weight_bytes == 2 else 4
    tokens = r.train.micro_batch_size * r.data.seq_len
    per_layer = layer_bytes(**shape["widths"], act_bytes=act_bytes)
    acts = activation_bytes(shape["layers"], per_layer, shape["hidden"], shape["vocab"], tokens, act_bytes,
                            weight_bytes, r.train.gradient_checkpointing)
    autocast_copies = n * act_bytes if act_bytes < weight_bytes else 0
    strategies = list(SHOWN) + ([launcher["strategy"]] if launcher.get("strategy") not in (None, *SHOWN) else [])
    memory = []
    for s in strategies:
        st = state_bytes(s, n, n_train, weight_bytes, mixed != "no", world)
        working = autocast_copies if not SHARDS[s] else 2 * shape["largest_unit"] * act_bytes if "weights" in \
            SHARDS[s] else 0
        memory.append(Memory(s, st["weights"], st["gradients"], st["optimiser"], acts, working))
    accelerators = []
    for a in ACCELERATORS:
        hours = gpu_hours(flops, a.bf16_flops, mfu)
        accelerators.append({"name": a.name, "bf16_tflops": a.bf16_flops / 1e12, "memory_gib": a.memory_gib,
                             "gpu_hours": hours, "wall_hours": hours / world,
                             "fits": [m.strategy for m in memory if m.total <= a.memory_gib * GiB]})
    notes = ["memory leaves out the CUDA context and allocator slack (typically 1-3 GiB per GPU)"]
    if shape["experts"]:
        notes.append(f"mixture of experts: N counts every expert; {shape['active']:,} parameters are active per "
                     f"token, so the FLOPs above overstate the work by {n / shape['active']:.1f}×")
    return TrainingPlan(
        recipe=os.fspath(recipe) if isinstance(recipe, (str, os.PathLike)) else "(recipe)", model=r.model.path,
        model_type=shape["model_type"], layers=shape["layers"], heads=shape["heads"],
        kv_heads_before=shape["kv_heads_before"], kv_heads=shape["kv_heads"], parameters_before=shape["before"],
        parameters=n, trainable=n_train, params=params_text(r.train.params), processes=world,
        micro_batch_size=r.train.micro_batch_size, grad_accum=r.train.grad_accum, seq_len=r.data.seq_len,
        tokens_per_step=tps, steps=budget.steps, tokens=budget.steps * tps, budget=budget.text, flops=flops,
        mixed_precision=mixed, weights_dtype=r.model.dtype, activation_checkpointing=r.train.gradient_checkpointing,
        strategy=launcher.get("strategy"), memory=memory, mfu=mfu, accelerators=accelerators, notes=notes)


# ------------------------------------------------------------------------------------------ inputs
def read_launcher(path) -> dict:
    """strategy, processes and mixed_precision of an accelerate launcher YAML (recipes/accelerate/*.yaml)."""
    raw = read_yaml(path)
    kind = str(raw.get("distributed_type", "NO")).upper()
    if kind == "DEEPSPEED":
        stage = int((raw.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)
        strategy = f"ZeRO-{stage}" if stage in (1, 2, 3) else "DDP"
    else:
        strategy = "FSDP" if kind == "FSDP" else "DDP"
    out = {"strategy": strategy,
           "processes": int(raw.get("num_processes") or 1) * int(raw.get("num_machines") or 1)}
    mp = raw.get("mixed_precision")
    if mp is not None:
        out["mixed_precision"] = "no" if mp is False else str(mp)
    return out


def model_shape(r: Recipe) -> dict:
    """Counts from the recipe's model config, after its conversion, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from uptrain.arch import kv_heads_text, spec_for_config
    from uptrain.kv_heads import per_layer_counts
    from uptrain.hf import carries_uptrain_code, load_config, resolve
    from uptrain.training.setup import trainable_mask

    src = resolve(r.model.path, r.model.revision, what="model.path")
    cfg = load_config(src)  # config.json only: no weights, no tokenizer
    spec = spec_for_config(cfg)
    if getattr(cfg, "is_encoder_decoder", False):  # FLOPs and activations below are a decoder-only model's
        raise UptrainError(f"uptrain plan estimates decoder-only models; {cfg.model_type} is an encoder-decoder, "
                           f"which it does not model yet (uptrain train runs it; see the recipe's header for sizing)")
    kv_before: int | str | tuple[int, ...] = spec.kv_heads(cfg)
    model_class: Any = None  # a per-layer result's model class (its own code)
    before, scale_kv, kv_after, widest = None, None, None, None
    if r.model.convert:
        o = r.model.convert
        o.check_source(spec, cfg)
        before = _meta_parameters(cfg)
        result = o.kv_heads if o.kv_budget is None else None
        if result is None:  # a KV budget: G_l are chosen at conversion; at most that fraction of the K/V weights
            scale_kv, kv_after = o.kv_budget, f"per-layer ({o.said('kv_budget')})"
        elif result.per_layer is not None:  # per-layer KV heads: uptrain/modeling's nemotron-nas model
            from uptrain.calibration.per_layer import per_layer_model_class

            groups = result.per_layer
            model_class, kv_after = per_layer_model_class(spec, cfg.to_dict(), groups), kv_heads_text(groups)
            widest = max(groups)  # the widest layer sizes the activations
        else:
            cfg = AutoConfig.for_model(**spec.result_config(cfg.to_dict(), result.value))
    with torch.device("meta"):
        model = model_class._from_config(cfg) if model_class else AutoModelForCausalLM.from_config(
            cfg, trust_remote_code=carries_uptrain_code(src) and not r.model.convert)  # its own code: ours
    named = dict(model.named_parameters())
    mask = trainable_mask(named, spec, r.train.params)
    count = {name: int(p.numel() * scale_kv) if scale_kv is not None and _is_kv(spec, name) else p.numel()
             for name, p in named.items()}
    n = sum(count.values())
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden, kv = getattr(text, spec.hidden_field), spec.kv_heads(text)
    if widest is not None:
        kv = widest
    per_layer = per_layer_counts(kv)
    if per_layer is not None:  # a per-layer checkpoint: the widest layer sizes the activations
        kv_after, kv = kv_after or kv_heads_text(per_layer), max(per_layer)
    if per_layer_counts(kv_before) is not None:
        kv_before = kv_heads_text(kv_before)
    # Mixtures of experts: k of E experts per token, each of width moe_intermediate_size when set.
    k = getattr(text, "num_experts_per_tok", None)
    n_experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 1
    experts = sum(p.numel() for name, p in named.items() if ".experts." in name)
    first = model.get_decoder().layers[0]
    # FSDP units: a decoder layer (the model's _no_split_modules), the embedding, the output projection.
    units = [sum(p.numel() for p in first.parameters())]
    units += [m.weight.numel() for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return {
        "model_type": cfg.model_type, "layers": spec.layers(text), "heads": spec.heads(text),
        "kv_heads_before": kv_before, "kv_heads": kv_after or kv, "before": before or n, "parameters": n,
        "trainable": sum(count[name] for name, t in mask.items() if t),
        "hidden": hidden, "vocab": text.vocab_size, "largest_unit": max(units),
        "widths": {"hidden": hidden, "kv_width": kv * spec.head_dim(text),
                   "intermediate": (getattr(text, "moe_intermediate_size", None) if k else None)
                   or text.intermediate_size, "gated": _gated(first), "experts_per_token": k or 1,
                   "shared_intermediate": getattr(text, "shared_expert_intermediate_size", 0) or 0},
        "experts": experts, "active": n - experts + experts * (k or n_experts) // n_experts,
    }


def _is_kv(spec, name: str) -> bool:
    try:
        return spec.classify(name)[0] == "kv"
    except UptrainError:
        return False


def _meta_parameters(cfg) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())


def _gated(layer) -> bool:
    """A gated MLP (SwiGLU: gate, up, down) has three projections per expert; GeLU MLPs two."""
    import torch

    mlp = getattr(layer, "mlp", None)
    if mlp is None:
        return True
    if hasattr(mlp, "experts"):
        return True  # every mixture of experts the table knows uses SwiGLU experts
    return sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) >= 3


def sci(x: float) -> str:
    """4.1e21, the way papers print FLOPs."""
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _gib(b: int) -> str:
    return f"{b / GiB:,.1f} GiB"

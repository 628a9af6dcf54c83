"""What a run is made of before its first step: the accelerator, the models (through uptrain/hf.py), the
trainable parameters and the optimiser. Errors here come before the output folder is touched."""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.hf import Source, load_config, load_tokenizer, local_folder, resolve
from uptrain.training.recipe import Recipe


# ---------------------------------------------------------------------------------------- accelerate
def reset_accelerate(world: int) -> None:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): a second train() in one
    process (the demo, a notebook) with other settings needs them cleared. Launched runs keep theirs."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_accelerator(r: Recipe, out: Path, world: int):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    # Ranks launched on a machine without an accelerator (`accelerate launch --config_file
    # recipes/accelerate/cpu.yaml`) only form a gloo group when accelerate is told cpu=True; otherwise
    # every rank would silently train alone.
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if r.log.trackers:  # accelerate drops a tracker whose package is missing without a word
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        available = {getattr(t, "value", str(t)) for t in get_available_trackers()}
        missing = [t for t in r.log.trackers if t not in available and t in {k.value for k in LoggerType}]
        if missing:
            raise UptrainError(f"log.trackers: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    cpu = world > 1 and not has_device
    if cpu and _launched_with("DEEPSPEED"):
        raise UptrainError("DeepSpeed needs GPUs; this machine has none, and accelerate would quietly train as "
                           "DDP. On CPU launch with recipes/accelerate/fsdp.yaml (FSDP2 over gloo) or cpu.yaml")
    try:
        acc = Accelerator(
            cpu=cpu,
            mixed_precision=r.train.mixed_precision,
            # Windows are cut by the loop, not by the end of the dataloader.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=r.train.grad_accum, sync_with_dataloader=False),
            # The loop steps the schedule once per optimiser step (accelerate would step it once per process).
            step_scheduler_with_optimizer=False,
            log_with=r.log.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
        if cpu and _launched_with("FSDP"):
            shard_on_cpu(acc)
    except (ValueError, ImportError) as e:
        raise UptrainError(f"accelerate could not start with this recipe: {e}") from e
    return acc


def strategy_text(acc) -> str:
    """How the run is distributed and in what precision, said at its start."""
    mixed = str(acc.mixed_precision)
    text = distribution_text(acc) + ("" if mixed == "no" else f"; {mixed} autocast")
    note = cpu_half_note(acc.device.type, mixed, cpu_bf16_supported())
    return text + (f" ({note})" if note else "")


def cpu_bf16_supported() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), without which bf16 matmuls are emulated."""
    import torch

    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p() for p in probes if p is not None)


def cpu_half_note(device_type: str, mixed: str, bf16_instructions: bool) -> str | None:
    """A warning for 16-bit autocast on a CPU that lacks the instructions that make it fast: there it is emulated
    and may run slower than float32. With them bf16 autocast is the faster path (measured: docs/training.md,
    tests/benchmarks/bench_cpu_precision.py)."""
    if device_type != "cpu" or mixed == "no":
        return None
    if mixed == "fp16":
        return ("fp16 matmuls are emulated on CPU, many times slower than float32: train.mixed_precision=bf16 (with "
                "bf16 instructions) or no")
    if not bf16_instructions:
        return ("this CPU has no bf16 instructions (AVX512-BF16, AMX): bf16 is emulated here and may be slower "
                "than float32; train.mixed_precision=no trains in float32")
    return None


def distribution_text(acc) -> str:
    """How the run is distributed."""
    kind, n = str(acc.distributed_type).split(".")[-1], acc.num_processes
    if kind == "FSDP":
        return (f"FSDP{acc.state.fsdp_plugin.fsdp_version}, parameters, gradients and optimiser state sharded over "
                f"{n} processes on {acc.device.type}")
    if kind == "DEEPSPEED":
        return f"DeepSpeed ZeRO-{acc.state.deepspeed_plugin.zero_stage} over {n} processes"
    return f"data parallel (DDP) over {n} processes on {acc.device.type}" if n > 1 else f"one process on {acc.device}"


def _launched_with(kind: str) -> bool:
    """`accelerate launch` passes the config's distributed_type to the ranks as ACCELERATE_USE_<KIND>."""
    return os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"


def shard_on_cpu(acc) -> None:
    """Make an FSDP launch on CPU ranks shard for real. accelerate 1.15 turns cpu=True into MULTI_CPU and only
    switches to FSDP for GPU-like types (AcceleratorState.__init__), so an FSDP config on CPU would train as
    DDP without a word. torch runs FSDP2 (`fully_shard`, DTensor) over gloo, and accelerate's FSDP2 path
    (prepare, save_state with SHARDED_STATE_DICT, get_state_dict) works on CPU once the state says FSDP: set
    it here, with the plugin the launcher's FSDP_* variables describe. FSDP1 (FlatParameter) is refused."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise UptrainError(f"FSDP on CPU ranks needs fsdp_version: 2 (FSDP2, fully_shard over gloo); the accelerate "
                           f"config says fsdp_version: {plugin.fsdp_version}. Set fsdp_config.fsdp_version: 2 "
                           f"(recipes/accelerate/fsdp.yaml does)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    # What AcceleratorState.__init__ does for FSDP on GPUs; PartialState too, because every AcceleratorState()
    # made later (inside prepare) copies the partial state over its own.
    acc.state.fsdp_plugin = plugin
    acc.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP


# ---------------------------------------------------------------------------------------- models
def model_source(path: str, revision: str | None, what: str) -> tuple[Source, object]:
    """(source, config) of a causal or encoder-decoder LM the attention table knows, or one clear error naming
    `what`."""
    from uptrain.arch import spec_for_config

    src = resolve(path, revision, what=what)
    cfg = load_config(src, causal=True, seq2seq=True)
    spec_for_config(cfg)  # raises for architectures the attention table does not know
    return src, cfg


def model_tokenizer(src: Source):
    tok = load_tokenizer(src, why="training tokenises the data with the model's own tokenizer: save it beside "
                                  "the weights")
    if tok.eos_token_id is None:
        raise UptrainError(f"the tokenizer of {src.what} {src.name!r} has no EOS token; packing needs one between "
                           f"documents")
    return tok


def check_teacher(r: Recipe, student_cfg, tokenizer, teacher) -> None:
    """A teacher must predict over the same vocabulary as the student (same size and same tokens)."""
    from uptrain.data import tokenizer_hash

    if teacher is not None:
        t_cfg, where = teacher.config, "the teacher"
    else:
        where = f"distill.teacher {r.distill.teacher!r}"
        assert r.distill.teacher is not None  # called with a teacher or distill.teacher
        t_cfg = model_source(r.distill.teacher, None, "distill.teacher")[1]
    t_vocab, seq2seq = t_cfg.vocab_size, bool(getattr(student_cfg, "is_encoder_decoder", False))
    if bool(getattr(t_cfg, "is_encoder_decoder", False)) != seq2seq:
        raise UptrainError(f"{where} is {'not ' if seq2seq else ''}an encoder-decoder and the student is"
                           f"{'' if seq2seq else ' not'}: distillation compares their predictions of the same "
                           f"targets, so both must be of the same kind")
    if t_vocab != student_cfg.vocab_size:
        raise UptrainError(f"{where} has a vocabulary of {t_vocab} tokens, the student {student_cfg.vocab_size}: "
                           f"distillation compares distributions over the same tokens")
    (t_layers, t_width), (s_layers, s_width) = _stack(t_cfg, seq2seq), _stack(student_cfg, seq2seq)
    if r.distill.hidden_weight > 0 and (t_layers, t_width) != (s_layers, s_width):
        raise UptrainError(f"{where} has {t_layers} layers of width {t_width}, the student {s_layers} of width "
                           f"{s_width}: distill.hidden_weight compares their layers' outputs one to one, so it "
                           f"needs the same stack (the source of a conversion has it); set hidden_weight: 0")
    if teacher is None:
        try:
            t_tok = model_tokenizer(resolve(r.distill.teacher, what="distill.teacher"))
        except UptrainError:
            return  # weights-only teacher folder: the vocabulary size check is what we can do
        if tokenizer_hash(t_tok) != tokenizer_hash(tokenizer):
            raise UptrainError(f"{where} has a different tokenizer than the student (same size, other tokens); "
                               f"distillation needs the same token ids")


def _stack(cfg, seq2seq: bool) -> tuple:
    """(decoder layers, hidden width) of a model config: what the hidden-state term pairs up."""
    text = cfg.get_text_config(decoder=True)
    return getattr(text, "num_decoder_layers" if seq2seq else "num_hidden_layers", None), text.hidden_size


def attention_patterns(spec) -> list[str]:
    """Glob patterns over parameter names that select the attention modules, read from the attention spec: the
    module holding the query and output projections in every decoder layer (Llama's self_attn, GPT-2's attn,
    GPT-NeoX's attention, Falcon's self_attention …), or every attention block of an encoder-decoder."""
    if spec.blocks:
        return [b.prefix.replace("{}", "*") + "*" for b in spec.blocks]
    module = []
    for a, b in zip(spec.q.split("."), spec.o.split(".")):
        if a != b:
            break
        module.append(a)
    if not module:  # pragma: no cover - every spec keeps q and o in one module (tests/training check each)
        raise UptrainError(f"the attention spec's q ({spec.q}) and o ({spec.o}) share no module: train.params "
                           f"attention cannot name this architecture's attention; give glob patterns instead")
    return [spec.layer_prefix.replace("{}", "*") + ".".join(module) + ".*"]


def trainable_mask(names, spec, params, strict: bool = True) -> dict[str, bool]:
    """name → trains? `params` is train.params: `all`; `attention`: every tensor of the attention modules
    (attention_patterns); `kv`: tensors whose shape depends on the KV-head count (k/v projections; for fused qkv
    layouts such as phi3 the whole qkv projection); or a list of glob patterns over parameter names, each of
    which must select at least one (a pattern that selects nothing is a typo, refused with names to copy).
    strict=False: no refusal, for names that are not the model's own (a checkpoint's may be spelled otherwise:
    old GPT-NeoX checkpoints store the model's lm_head as embed_out)."""
    names = list(names)
    if params == "all":
        return {n: True for n in names}
    if params == "kv":
        def is_kv(name):
            try:
                return spec.classify(name)[0] == "kv"
            except UptrainError:
                return False

        return {n: is_kv(n) for n in names}
    patterns = attention_patterns(spec) if params == "attention" else list(params)

    def spelled(name):  # a base model's checkpoint names lack the root (GPT-2's h.0.… for transformer.h.0.…)
        return (name, spec.root + name) if spec.root and not name.startswith(spec.root) else (name,)

    hits = {p: [n for n in names if any(fnmatch.fnmatchcase(s, p) for s in spelled(n))] for p in patterns}
    unused = [p for p, got in hits.items() if not got]
    if unused and strict and params != "attention":  # (attention selecting nothing: the caller's "selects no parameter")
        shown = ", ".join(dict.fromkeys(names[:3] + names[len(names) // 2:len(names) // 2 + 2] + names[-1:]))
        raise UptrainError(f"train.params: {', '.join(map(repr, unused))} match{'es' if len(unused) == 1 else ''} "
                           f"no parameter of this model; patterns are globs over whole parameter names (* matches "
                           f"dots too), and the names look like: {shown}")
    chosen = {n for got in hits.values() for n in got}
    return {n: n in chosen for n in names}


def model_parameter_names(src: Source, cfg) -> list[str] | None:
    """The parameter names of the model `cfg` describes, built on the meta device (no memory, no weights read);
    None when transformers cannot build it from the config alone."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from uptrain.hf import carries_uptrain_code

    auto = AutoModelForSeq2SeqLM if getattr(cfg, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(cfg, trust_remote_code=carries_uptrain_code(src))
    except (ValueError, OSError, ImportError, TypeError):  # then the loaded model's names are checked
        return None
    return [n for n, _ in model.named_parameters()]


SHARDED = ("FSDP", "DEEPSPEED")  # DistributedType values whose parameters are sharded


def adamw(groups, o, fused: bool):
    """AdamW, the fused kernel where torch has one for the device (what transformers' Trainer uses too)."""
    import torch

    if fused:
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def enable_checkpointing(model) -> None:
    """Per decoder layer, non-reentrant (what FSDP2 and frozen inputs need)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


SAVE_DTYPES = ("float32", "bfloat16", "float16")


def checkpoint_dtype(src: Source, cfg) -> str | None:
    """The dtype a checkpoint stores its weights in: the float dtype holding the most parameters in its shard
    headers (checkpoint.kv_dtype's rule), else config.json's dtype; None when neither is one a model is saved
    in (float8, float64)."""
    from uptrain.checkpoint import CHECKPOINT_FILES, DTYPES, kv_dtype, open_source

    try:
        folder = local_folder(src, CHECKPOINT_FILES)[0]
        name = str(DTYPES[kv_dtype(open_source(folder, allow_pickle=True).entries)])
    except UptrainError:  # weights transformers found where we do not look (a Hub model's .bin): the config
        name = str(getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None))
    name = name.removeprefix("torch.")
    return name if name in SAVE_DTYPES else None


def cast_floats(state_dict: dict, dtype: str) -> dict:
    """The state dict with floating tensors in `dtype`, entry by entry (a 7B float32 state dict is never held
    twice over)."""
    import torch

    to = getattr(torch, dtype)
    for k, v in state_dict.items():
        if v.is_floating_point() and v.dtype != to:
            state_dict[k] = v.to(to)
    return state_dict

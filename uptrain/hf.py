"""Where a model comes from and how it is loaded: a local folder, a snapshot in the Hugging Face cache, or a
Hub repo id (+ revision). One resolver, one set of loaders for config / tokenizer / model, one set of
error messages. `what` is the caller's name for the model ("model.path", "distill.teacher", "model",
"source"), so a message says which input is wrong.

    src = resolve("meta-llama/Llama-2-7b-hf", what="model.path")
    cfg = load_config(src, causal=True); tok = load_tokenizer(src, why="…"); model = load_model(src)
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from uptrain.errors import UptrainError

# models--{owner}--{name}/snapshots/{commit}: how huggingface_hub lays out its cache
_SNAPSHOT = re.compile(r"models--([\w.-]+?)--([\w.-]+)/snapshots/([0-9a-f]{40})/?$")


def is_hub_id(name) -> bool:
    """A Hub repo id rather than a local path: not an existing path, not path-like, and valid for
    huggingface_hub's own `validate_repo_id`."""
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.isabs(name):
        return False
    if os.path.exists(name):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_id(name: str, what: str) -> str:
    """`name` when it is a valid Hub repo id, else one UptrainError naming `what` (e.g. "--repo-id")."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise UptrainError(f"{what} {name!r} is not a Hub repo id: {e}") from e
    return name


def hub_token(token: str | None = None) -> str | None:
    """The token a Hub upload would use: the given one, else HF_TOKEN, else the saved login (huggingface_hub's
    own lookup); None without one. Never printed."""
    from huggingface_hub import get_token

    return token or get_token()


def check_hub_token(token: str, what: str) -> str | None:
    """Ask the Hub whether `token` can write (one whoami call): one UptrainError naming `what` for a token it
    rejects (401) or a read-only one; None when it can, a note when the Hub cannot be asked (offline)."""
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi().whoami(token=token)
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise UptrainError(f"{what}: the Hub rejected the Hugging Face token (401): it is invalid or expired. "
                               f"Create a write token at {HfApi().endpoint}/settings/tokens and set HF_TOKEN or "
                               f"`hf auth login`") from None
        return f"the token could not be checked ({status}); the upload will tell"
    except Exception as e:  # offline, no network: the upload will tell
        return f"the token could not be checked ({type(e).__name__}); the upload will tell"
    role = ((info.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        raise UptrainError(f"{what}: the Hugging Face token is read-only; uploading needs a write token (create one "
                           f"at {HfApi().endpoint}/settings/tokens)")
    return None


def snapshot_repo(path) -> tuple[str, str] | None:
    """(repo id, commit) of a folder inside the Hugging Face cache, else None."""
    m = _SNAPSHOT.search(str(path).replace(os.sep, "/"))
    return (f"{m.group(1)}/{m.group(2)}", m.group(3)) if m else None


@dataclass(frozen=True)
class Source:
    """A resolved model source. `path` is what transformers loads (a folder or the Hub id); `hub_id` is
    the Hub repo it is known to come from (a Hub id, or the repo of an HF-cache snapshot), else None."""

    name: str  # as the user gave it
    path: str
    local: bool
    revision: str | None = None
    hub_id: str | None = None
    what: str = "model"

    def __str__(self) -> str:
        return self.name


def resolve(src, revision: str | None = None, what: str = "model") -> Source:
    """A local folder or a Hub id, checked without touching the network; a path that exists nowhere and is no
    valid repo id is refused here with one message."""
    if isinstance(src, Source):
        return src
    name = os.fspath(src)
    path = Path(name).expanduser()
    if path.is_dir():
        snap = snapshot_repo(path.resolve())
        return Source(name, str(path), True, revision or (snap[1] if snap else None), snap[0] if snap else None, what)
    if path.exists():
        raise UptrainError(f"{what} {name!r} is a file; give the checkpoint folder that holds config.json")
    if not is_hub_id(name):
        raise UptrainError(f"{what} {name!r} not found: not a folder, nor a Hub repo id")
    return Source(name, name, False, revision, name, what)


def local_folder(source: Source, allow_patterns: list[str]) -> tuple[Path, str | None]:
    """(folder, commit) with the files of `source` on disk: the folder itself, or a Hub snapshot downloaded
    with huggingface_hub (only `allow_patterns`)."""
    if source.local:
        return Path(source.path).resolve(), None
    from huggingface_hub import snapshot_download

    try:
        local = Path(snapshot_download(source.path, revision=source.revision, allow_patterns=allow_patterns))
    except Exception as e:  # offline, 404, gated, auth: one message, no traceback
        raise UptrainError(f"{source.what} {source.name!r} is not a local folder and could not be downloaded from "
                           f"the Hub ({type(e).__name__}: {_first_line(e)}). Check the path, or the repo id, your "
                           f"network and `hf auth login` for gated models") from e
    return local, local.name  # snapshot folders are named by commit hash


def load_config(source: Source, causal: bool = False, seq2seq: bool = False):
    """The transformers config; with `causal`, also checks that it is a causal LM with weights beside it
    (with `seq2seq` too, an encoder-decoder LM such as T5 is accepted in its place)."""
    if source.local and not os.path.isfile(os.path.join(source.path, "config.json")):
        raise UptrainError(f"{source.what} {source.name!r} has no config.json: not a Hugging Face model folder")
    from transformers import AutoConfig

    try:  # uptrain's own configuration code (a per-layer nemotron-nas result) is trusted, no one else's
        cfg = AutoConfig.from_pretrained(source.path, revision=source.revision,
                                         trust_remote_code=carries_uptrain_code(source))
    except Exception as e:  # offline, unknown repo, bad JSON: one message
        raise UptrainError(f"could not read the config of {source.what} {source.name!r}: {type(e).__name__}: "
                           f"{_first_line(e)}") from e
    if causal:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL

        classes = {c for v in CAUSAL.values() for c in ((v,) if isinstance(v, str) else v)}
        # a causal LM whose class travels with it (uptrain's GQA modeling files): auto_map names it
        remote = (getattr(cfg, "auto_map", None) or {}).get("AutoModelForCausalLM")
        classes |= {remote.rsplit(".", 1)[-1]} if isinstance(remote, str) else set()
        archs = getattr(cfg, "architectures", None) or []
        if seq2seq and getattr(cfg, "is_encoder_decoder", False):
            from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as S2S

            CAUSAL = S2S
            classes = {c for v in S2S.values() for c in ((v,) if isinstance(v, str) else v)}
            remote = (getattr(cfg, "auto_map", None) or {}).get("AutoModelForSeq2SeqLM")
            classes |= {remote.rsplit(".", 1)[-1]} if isinstance(remote, str) else set()
        if (cfg.model_type not in CAUSAL and not isinstance(remote, str)) or (archs and not set(archs) & classes):
            raise UptrainError(f"{source.what} {source.name!r} is not a causal language model (model_type "
                               f"{cfg.model_type!r}, architectures {archs}); an AutoModelForCausalLM checkpoint "
                               f"is needed")
        if source.local and not any(f.endswith((".safetensors", ".bin")) for f in os.listdir(source.path)):
            raise UptrainError(f"{source.what} {source.name!r} has a config but no weights (*.safetensors / *.bin)")
    return cfg


def load_tokenizer(source: Source, why: str):
    """The tokenizer saved with the model; `why` says what it is needed for and how to fix its absence."""
    from transformers import AutoTokenizer

    try:
        # AutoTokenizer reads the config too: uptrain's own configuration code (nemotron-nas) is trusted
        return AutoTokenizer.from_pretrained(source.path, revision=source.revision,
                                             trust_remote_code=carries_uptrain_code(source))
    except Exception as e:
        raise UptrainError(f"no usable tokenizer in {source.what} {source.name!r} ({type(e).__name__}): {why}") from e


def load_model(source: Source, dtype="auto", device=None, quiet: bool = False, drop_quantization_config=False):
    """AutoModelForCausalLM (AutoModelForSeq2SeqLM for an encoder-decoder) in `dtype` ("auto", a name such as "bfloat16", or a torch.dtype), on `device`.
    quiet: no transformers loading bar (the caller shows its own). drop_quantization_config: load plain float
    weights whose config.json still carries a quantization_config (checkpoint.quantization says it is a
    leftover) without a quantizer, so that the model can be saved."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.utils import logging as hf_logging

    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else (dtype or "auto")
    bar = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        kw, remote = {}, carries_uptrain_code(source)
        config = AutoConfig.from_pretrained(source.path, revision=source.revision, trust_remote_code=remote)
        # an encoder-decoder (T5) loads as a seq2seq LM; its uptrain GQA class is named in auto_map the same way
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        if drop_quantization_config:
            kw["config"] = config
            for cfg in {id(c): c for c in (kw["config"], kw["config"].get_text_config(decoder=True))}.values():
                if hasattr(cfg, "quantization_config"):
                    del cfg.quantization_config
        model = auto.from_pretrained(source.path, revision=source.revision, dtype=dtype, trust_remote_code=remote,
                                     **kw)
    except Exception as e:
        raise UptrainError(f"could not load {source.what} {source.name!r} with transformers: {type(e).__name__}: "
                           f"{_first_line(e)}") from e
    finally:
        if quiet and bar:
            hf_logging.enable_progress_bar()
    return model.to(device) if device is not None else model


def carries_uptrain_code(source: Source) -> bool:
    """Whether `source` carries GQA modeling code that uptrain wrote: config.json's auto_map names only
    uptrain/modeling templates, byte for byte (a GPT-2 / GPT-NeoX / OPT converted below G = H). Such a
    model is loaded with trust_remote_code=True; code from anyone else is never run without the user."""
    import json

    from uptrain.modeling import code_files, ours

    def read(name: str) -> bytes | None:
        if source.local:
            path = Path(source.path) / name
            return path.read_bytes() if path.is_file() else None
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(source.path, name, revision=source.revision)).read_bytes()
        except Exception:  # offline, missing file: not ours to trust
            return None

    raw = read("config.json")
    try:
        auto_map = json.loads(raw).get("auto_map") if raw else None
    except ValueError:
        return False
    return bool(code_files(auto_map)) and ours(auto_map, read)


LICENCE_KEYS = ("license", "license_name", "license_link")


def card_licence(folder) -> dict:
    """license / license_name / license_link from the model card (README.md) in `folder`, read with
    huggingface_hub's ModelCard; {} when there is no card or it has no licence."""
    card = Path(folder) / "README.md"
    if not card.is_file() or not card.read_text(encoding="utf-8", errors="replace").startswith("---"):
        return {}  # no front matter (ModelCard.load would log a warning about it)
    from huggingface_hub import ModelCard

    try:
        data = ModelCard.load(card).data.to_dict()
    except Exception:  # a card whose front matter does not parse says nothing we can use
        return {}
    return {k: data[k] for k in LICENCE_KEYS if data.get(k)}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""

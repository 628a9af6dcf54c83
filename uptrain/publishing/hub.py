"""`uptrain push`: validate a checkpoint folder, write its model card, upload it to the Hub in one commit
(a folder above LARGE_FOLDER_BYTES: the weights first, then the rest with the card in a final commit).

Only an allow-list of files leaves the machine (config, safetensors weights named by the index, tokenizer,
chat template, uptrain.json, recipe.yaml, licence files, the card and the plots it shows): optimizer
states, `checkpoint-*` folders and logs stay home without anyone having to remember to delete them.

DIR itself is never modified. The upload is staged in a temporary folder holding links to DIR's files
plus the card, and that folder is what `upload_folder` sees. Writing README.md into DIR instead would
turn our card into "a card the user wrote" on the next push, and a push that changes its input is a
surprise; the staging folder costs a few symlinks, not copies.

Transient Hub failures (5xx, 408, 429, connection errors and timeouts) are retried HUB_TRIES times in all,
waiting 2, 4, 8 s (a 429's Retry-After wins, up to a minute); 4xx answers (bad token, no access, invalid
card) fail at once. huggingface_hub 2.x has no `upload_large_folder`: with hf_xet installed `upload_folder`
itself streams, batches big uploads into several commits and resumes an interrupted one when called again
(already committed files are skipped, uploaded chunks deduplicated), so a retry is a resume. Above
LARGE_FOLDER_BYTES, where one commit stops being a good bet (hours of upload, the pipeline's own batching by
file count and time), the weights go up first and config, index, tokenizer and the card last, with the
deletion of stale weights: the repo switches to the new model in that final commit and its card never
describes weights that are not there yet.
"""
from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from uptrain.arch import PER_LAYER_SPECS, SPECS, attention_kind, attention_shape, kv_heads_text
from uptrain.checkpoint import read_safetensors_header
from uptrain.errors import UptrainError
from uptrain.hf import hub_token
from uptrain.kv_heads import KVHeads
from uptrain.modeling import code_files
from uptrain.publishing.card_facts import IMAGE_SUFFIXES, source_name
from uptrain.publishing.model_card import is_generated, model_card
from uptrain.publishing.options import PushOptions
from uptrain.record import FILENAME as RECORD, Record, read_record, try_read_record
from uptrain.report import fmt_bytes
from uptrain.training.run_folder import RECIPE

INDEX = "model.safetensors.index.json"
# Besides these: the weights the index names, the tokenizer/generation/chat-template/licence files the
# converter copies (checkpoint.COMPANION_FILES, one list for both), and the images the card shows.
ALLOWED_FILES = frozenset({"config.json", INDEX, RECORD, RECIPE, "README.md"})
PLOTS_DIR = "plots"
# Why a file is left out, for the listing (first match wins); anything else: "not in the allow-list".
LEFTOVERS = (
    ("checkpoints", "training checkpoints"), ("checkpoint-*", "training checkpoint"), ("step_*", "training checkpoint"),
    ("optimizer*", "optimizer state"), ("scheduler*", "scheduler state"),
    ("rng_state*", "RNG state"), ("trainer_state.json", "trainer state"), ("training_args.bin", "trainer state"),
    ("step0", "the converted model before uptraining"), ("metrics.jsonl", "training log"),
    ("*.log", "log"), ("logs", "logs"), ("runs", "logs"), ("wandb", "logs"), ("events.out.tfevents*", "log"),
    ("*.bin", "pickled file (only safetensors weights are uploaded)"), ("*.pt", "pickled file"),
    ("*.pth", "pickled file"), ("*.ckpt", "pickled file"), ("*.safetensors", "weights not named by the index"),
)
# A push replaces the model: weights a previous push left on the branch must go in the same commit, or a
# stale index (or stale shards) would be loaded instead of the new single file.
DELETE_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
HUB_TRIES = 4  # one call and up to three retries of a transient failure
BACKOFF_S = 2.0  # the first wait; doubled for each retry
LARGE_FOLDER_BYTES = 10 << 30  # 10 GiB: above it, weights first and the card last (module docstring)


@dataclass
class PushResult:
    repo_id: str
    files: list[tuple[str, int]]  # (path in the repo, bytes), in upload order
    skipped: list[tuple[str, str]]  # (path in DIR, why it is not uploaded)
    card: str
    card_origin: str  # "generated" | "kept" | "regenerated"
    private: bool = False
    revision: str | None = None
    dry_run: bool = False
    url: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)
    large: bool = False  # above LARGE_FOLDER_BYTES: weights first, then the rest in a final commit

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)

    def listing(self) -> str:
        width = max(len(f) for f, _ in self.files)
        lines = [f"  {f:<{width}}  {fmt_bytes(n):>10}" for f, n in self.files]
        if self.skipped:
            lines.append("left out:")
            lines += [f"  {f}  — {why}" for f, why in self.skipped]
        return "\n".join(lines)

    def summary(self) -> str:
        where = (self.repo_id + (f" (branch {self.revision})" if self.revision else "")
                 + (", private" if self.private else ""))
        card = {"generated": "generated from uptrain.json", "kept": "your README.md, kept",
                "regenerated": "generated, replacing your README.md (--overwrite-card)"}[self.card_origin]
        notes = "".join(f"note: {n}\n" for n in self.notes)
        if self.dry_run:
            return (f"dry run: nothing uploaded. Would push {len(self.files)} files "
                    f"({fmt_bytes(self.total_bytes)}) to {where}:\n{self.listing()}\n{notes}"
                    f"model card (README.md, {card}):\n\n{self.card}")
        how = "the weights first, then the rest with the card in a final commit" if self.large else "in one commit"
        return (f"pushed {len(self.files)} files ({fmt_bytes(self.total_bytes)}) to {where}, {how}; "
                f"model card: {card}\n{self.listing()}\n{notes}{self.url}")


# --------------------------------------------------------------------------------------- validation
def read_header(path: Path) -> dict:
    """The tensor table of a shard to publish: exactly as long as its header says."""
    header, _ = read_safetensors_header(path, exact=True, fix="re-create or re-copy it")
    header.pop("__metadata__", None)
    return header


def check_weights(folder: Path) -> tuple[list[str], dict]:
    """Weight files to upload and {tensor name: header entry}; the index and every shard must agree."""
    if not (folder / INDEX).is_file():
        if (folder / "model.safetensors").is_file():
            return ["model.safetensors"], read_header(folder / "model.safetensors")
        raise UptrainError(f"no safetensors weights in {folder} (model.safetensors or {INDEX}); only safetensors "
                           f"are uploaded — `uptrain convert` and `uptrain train` write them")
    try:
        weight_map = dict(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise UptrainError(f"{INDEX} is not a valid shard index ({e!r})") from e
    shards: dict[str, set] = defaultdict(set)
    for tensor, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise UptrainError(f"{INDEX} points outside the folder: {shard!r}")
        shards[shard].add(tensor)
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise UptrainError(f"{len(missing)} of {len(shards)} shards named in {INDEX} are missing: "
                           f"{', '.join(missing)}; the checkpoint is incomplete — re-run the conversion or copy them")
    tensors = {}
    for shard, names in sorted(shards.items()):
        header = read_header(folder / shard)
        if set(header) != names:
            extra, absent = sorted(set(header) - names), sorted(names - set(header))
            raise UptrainError(f"{shard} does not match {INDEX}: " + "; ".join(
                x for x in (extra and f"not in the index: {', '.join(extra[:5])}",
                            absent and f"missing from the shard: {', '.join(absent[:5])}") if x))
        tensors.update(header)
    return sorted(shards), tensors


def checked_config_json(folder: Path) -> dict:
    """config.json as a dict, after checking transformers can load it (known model_type, valid fields)."""
    if not (folder / "config.json").is_file():
        raise UptrainError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        from transformers import AutoConfig

        from uptrain.hf import carries_uptrain_code, resolve

        # uptrain's own configuration code (a per-layer nemotron-nas result) runs; no one else's
        AutoConfig.from_pretrained(str(folder), trust_remote_code=carries_uptrain_code(resolve(str(folder))))
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise UptrainError(f"{folder}/config.json does not load with transformers: {e}") from e


def _kv_heads(config: dict) -> int | None:
    try:
        return attention_shape(config).kv_heads
    except (UptrainError, TypeError, ZeroDivisionError):  # a config without the usual fields
        return None


def check_kv_heads(config: dict, record: Record | None, tensors: dict) -> None:
    """The KV-head count must agree between config.json, uptrain.json and the K/V weight shapes (per layer for a
    per-layer checkpoint)."""
    mt = config.get("model_type")
    spec = SPECS.get(mt) or PER_LAYER_SPECS.get(mt)
    spec = spec.for_config(config) if spec is not None else None  # with its optional tensors (arch.Extra)
    kv = _kv_heads(config)
    after = record.conversion.kv_heads_after if record and record.conversion else None
    if after and kv is not None and _same(after) != _same(kv):
        raise UptrainError(f"config.json has {kv_heads_text(kv)} KV heads but uptrain.json records a conversion to "
                           f"{kv_heads_text(after)}: the folder mixes two models")
    if spec is None:
        return
    per_layer = spec.layer_kv_heads(config)
    for name, entry in tensors.items():
        try:
            kind, layer, suffix = spec.classify(name)
        except UptrainError:  # the converter is strict about unknown tensors; publishing need not be
            continue
        if kind == "kv" and "{}" not in suffix:  # (a one-tensor-per-head family has head_dim rows per tensor)
            g = per_layer[layer] if isinstance(layer, int) and layer < len(per_layer) else None
            rows = spec.rows(suffix, config, kv_heads=g if spec.per_layer else None)[-1][2]
            have = spec.kv_rows_in(suffix, tuple(entry["shape"]))
            if have != rows:  # kv_rows_in: GPT-2's Conv1D holds its heads along dim 1
                raise UptrainError(f"{name} has {have} rows but config.json's {g if spec.per_layer else kv} KV heads "
                                   f"× head_dim {spec.head_dim(config)} need {rows}: weights and config disagree")


def _same(kv):
    """KV heads as one comparable value: a per-layer list whose layers agree is its one count."""
    try:
        return KVHeads.of(kv).value
    except ValueError:  # not a count (None): compared as it is
        return kv


def _parse_json_files(folder: Path, names: list[str]) -> None:
    """Every JSON file to upload parses (uptrain.json was already read through record.py)."""
    for name in names:
        if name.endswith(".json") and name != RECORD:
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise UptrainError(f"{name} is not valid JSON ({e}); a truncated copy?") from e


# --------------------------------------------------------------------------------------- selection
def allowed(name: str) -> bool:
    from uptrain.checkpoint import COMPANION_FILES

    return name in ALLOWED_FILES or any(fnmatch.fnmatch(name, pat) for pat in COMPANION_FILES)


def _why_left_out(name: str) -> str:
    return next((why for pat, why in LEFTOVERS if fnmatch.fnmatch(name, pat)), "not in the allow-list")


def _images(folder: Path) -> list[str]:
    top = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
    plots = folder / PLOTS_DIR
    sub = [f"{PLOTS_DIR}/{p.name}" for p in plots.iterdir()
           if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)] if plots.is_dir() else []
    return sorted(top + sub)


def _referenced(card: str, candidates: list[str]) -> list[str]:
    links = set(re.findall(r"\]\(\s*<?([^)\s>]+)", card)) | set(re.findall(r"src=[\"']([^\"']+)", card))
    links = {link.removeprefix("./") for link in links}
    return [c for c in candidates if c in links]


def select_files(folder: Path, weights: list[str], images: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to upload, (left-out entry, why)); folders are listed once with a trailing slash."""
    keep, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if p.name == PLOTS_DIR:
                inside = [f"{PLOTS_DIR}/{q.name}" for q in sorted(p.iterdir())]
                keep += [f for f in inside if f in images]
                skipped += [(f, "not shown in the model card") for f in inside if f not in images]
            else:
                skipped.append((p.name + "/", _why_left_out(p.name)))
        elif allowed(p.name) or p.name in weights or p.name in images:
            keep.append(p.name)
        elif p.name.lower().endswith(IMAGE_SUFFIXES):
            skipped.append((p.name, "not shown in the model card"))
        else:
            skipped.append((p.name, _why_left_out(p.name)))
    return keep, skipped


@dataclass
class Upload:
    """What `uptrain push` would send: the files, those left out and why, the card."""

    files: list[str]
    skipped: list[tuple[str, str]]
    card: str
    card_origin: str
    notes: list[str]


def plan_upload(folder, repo_id: str, eval_json=None, overwrite_card: bool = False,
                base_model: str | None = None, said: PushOptions | None = None) -> Upload:
    """Validate DIR, choose the files, write the card. Reads only; touches neither DIR nor the network.
    base_model: the Hub model the card names as `base_model`, over what uptrain.json suggests. said: the
    caller's options, for the words of a note (--base-model or base_model)."""
    said = said or PushOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise UptrainError(f"{folder} is not a folder")
    config = checked_config_json(folder)
    weights, tensors = check_weights(folder)
    record = read_record(folder)
    check_kv_heads(config, record, tensors)
    notes = [] if record else ["no uptrain.json: the card can only describe the config"]

    readme = folder / "README.md"
    user_card = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if user_card is not None and not is_generated(user_card) and not overwrite_card:
        images = _referenced(user_card, _images(folder))
        files, skipped = select_files(folder, weights + code_files(config.get("auto_map")), images)
        card, origin = user_card, "kept"
        if base_model:
            notes.append(f"{said.key('base_model')} {base_model} is not used: README.md is your own card, kept as it "
                         f"is (set base_model in its front matter, or replace it with {said.said('overwrite_card', True)})")
    else:
        # the modeling file that config.json's auto_map names travels with the weights (trust_remote_code)
        files, skipped = select_files(folder, weights + code_files(config.get("auto_map")), _images(folder))
        files = sorted(set(files) | {"README.md"})
        card = model_card(folder, repo_id, files, eval_json, base_model=base_model)
        origin = "regenerated" if user_card is not None and not is_generated(user_card) else "generated"
    _parse_json_files(folder, files)
    if not any(f.startswith("tokenizer") or f in ("vocab.json", "spiece.model") for f in files):
        notes.append("no tokenizer files: users will need the source model's tokenizer")
    return Upload(files=files, skipped=skipped, card=card, card_origin=origin, notes=notes)


# --------------------------------------------------------------------------------------- upload
def resolve_token(token: str | None = None, key: str = "token") -> str:
    """The token option, else HF_TOKEN, else the saved login (uptrain.hf.hub_token, which training checks too).
    Never printed. key: how the caller names the option (--token, token)."""
    token = hub_token(token)
    if not token:
        raise UptrainError(f"no Hugging Face token: pass {key}, set HF_TOKEN, or log in once with "
                           f"`hf auth login` (the token needs write access). Nothing was created or uploaded")
    return token


@contextmanager
def hub_errors(repo_id: str, revision: str | None, endpoint: str, token: str, said: PushOptions | None = None):
    """Turn huggingface_hub's exceptions into one clear message each (with the token scrubbed out); said: the
    caller's options, for the words of a remedy."""
    said = said or PushOptions()
    from huggingface_hub import errors

    def fail(msg, e):
        raise UptrainError(msg.replace(token, "***")) from e

    owner = repo_id.split("/")[0] if "/" in repo_id else "your account"
    try:
        yield
    except errors.OfflineModeIsEnabled as e:
        fail(f"HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it (or use {said.said('dry_run', True)})", e)
    except errors.RevisionNotFoundError as e:
        fail(f"branch {revision!r} does not exist in {repo_id} and could not be created: {e.server_message or e}", e)
    except errors.RepositoryNotFoundError as e:
        fail(f"{repo_id} was not found on {endpoint} (or this token cannot see it)", e)
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        server = f" (the Hub says: {e.server_message})" if e.server_message else ""
        if status == 401:
            fail(f"the Hub rejected the token (401 Unauthorized): it is invalid or expired. Create a write token "
                 f"at {endpoint}/settings/tokens and pass it with {said.key('token')} or HF_TOKEN{server}", e)
        if status == 403:
            fail(f"no write access to {repo_id} (403 Forbidden): the repo or the namespace {owner!r} belongs to "
                 f"someone else, or the token is read-only. Use a repo id under your own name or an organisation "
                 f"you can write to, with a write token{server}", e)
        if status is not None and (status >= 500 or status in (408, 429)):
            fail(f"the Hub had a server error ({status}){_tries(e)} — try again later: a rerun resumes the "
                 f"upload{server}", e)
        if revision and status in (400, 409, 422):
            fail(f"the Hub refused branch {revision!r} of {repo_id} ({status}){server}", e)
        fail(f"the Hub refused the upload to {repo_id} ({status}){server}", e)
    except (getattr(errors, "HTTPError", OSError), ConnectionError, TimeoutError) as e:
        fail(f"cannot reach {endpoint} ({type(e).__name__}){_tries(e)}: is the network up? HF_ENDPOINT selects "
             f"another Hub", e)
    except ValueError as e:  # e.g. the Hub's check of the card's YAML metadata
        fail(f"the upload to {repo_id} was refused: {e}", e)


def transient(e: BaseException) -> bool:
    """A failure worth another try: a 5xx, 408 or 429 answer, a connection error or a timeout. Never a 4xx
    (bad token, no access, invalid card) nor offline mode."""
    from huggingface_hub import errors

    if isinstance(e, errors.OfflineModeIsEnabled):
        return False
    if isinstance(e, errors.HfHubHTTPError):
        status = e.response.status_code if e.response is not None else None
        return status is not None and (status >= 500 or status in (408, 429))
    http = sys.modules.get(getattr(errors, "HTTPError", OSError).__module__)  # httpx2 (or httpx)
    return isinstance(e, (ConnectionError, TimeoutError, *((http.TransportError,) if hasattr(http, "TransportError")
                                                          else ())))


def _retry_after(e: BaseException) -> float | None:
    response = getattr(e, "response", None)
    try:
        return min(60.0, float(response.headers["Retry-After"])) if response is not None else None
    except (KeyError, TypeError, ValueError):
        return None


def _tries(e: BaseException) -> str:
    n = getattr(e, "uptrain_tries", 1)
    return f" after {n} tries" if n > 1 else ""


def _sleep(seconds: float) -> None:  # (tests replace it)
    time.sleep(seconds)


def with_retries(call, what: str):
    """call(), again after a transient failure (HUB_TRIES in all, exponential backoff); the last failure,
    or the first that is not transient, is raised with the number of tries (`uptrain_tries`)."""
    for attempt in range(1, HUB_TRIES + 1):
        try:
            return call()
        except Exception as e:
            if attempt == HUB_TRIES or not transient(e):
                e.uptrain_tries = attempt
                raise
            wait = _retry_after(e) or BACKOFF_S * 2 ** (attempt - 1)
            status = getattr(getattr(e, "response", None), "status_code", None)
            print(f"{what}: {status or type(e).__name__} from the Hub; trying again in {wait:g} s (try "
                  f"{attempt + 1} of {HUB_TRIES})", file=sys.stderr, flush=True)
            _sleep(wait)


@contextmanager
def staged(folder: Path, files: list[str], card: str):
    """A temporary folder holding exactly `files` (links to DIR's) with README.md = `card`."""
    with tempfile.TemporaryDirectory(prefix="uptrain-push-") as tmp:
        for name in files:
            dst = Path(tmp) / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if name == "README.md":
                dst.write_text(card, encoding="utf-8")
                continue
            try:
                os.symlink((folder / name).resolve(), dst)
            except OSError:  # no symlinks (some Windows setups): copy
                shutil.copy2(folder / name, dst)
        yield tmp


def _pattern(name: str) -> str:
    """An fnmatch pattern matching exactly `name` (allow_patterns are globs)."""
    return re.sub(r"([*?[])", r"[\1]", name)


def _default_message(folder: Path, base_model: str | None = None) -> str:
    rec = try_read_record(folder)
    if rec is None:
        return "Upload model with uptrain"
    conv = rec.conversion
    src = base_model or (source_name(conv) if conv else None)
    kind = attention_kind(conv.num_attention_heads, conv.kv_heads_after) if conv else "?"
    what = f"{kind} conversion of {src}" if kind != "?" else "model"
    return f"Upload {what}" + (" (uptrained)" if rec.uptraining else "") + " with uptrain"


def push(dir, repo_id: str | None = None, *, options: PushOptions | None = None, **kwargs) -> PushResult:
    """Validate DIR, write its model card, and upload the allow-listed files to `repo_id` in one commit.

    Options are the fields of PushOptions (uptrain/publishing/options.py), given as keyword arguments
    (`push(folder, "me/x", dry_run=True)`) or as one `options=` object, never both; they are the flags of
    `uptrain push`. base_model: the Hub model this one derives from (e.g. the Hub id of a local source copy),
    written as the card's `base_model` instead of what uptrain.json suggests."""
    if options is not None and (kwargs or repo_id is not None):
        raise UptrainError(f"push() takes options= or keyword options, not both "
                           f"(got {', '.join(['repo_id'] * (repo_id is not None) + list(kwargs))})")
    o = (options or PushOptions.from_kwargs("python", repo_id=repo_id, **kwargs)).check()
    repo_id, private, revision, token = o.repo_id, o.private, o.revision, o.token
    if not o.dry_run:  # cheap checks first: no token, no need to wait for the folder's validation
        token = resolve_token(token, o.key("token"))
    folder = Path(dir)
    p = plan_upload(folder, repo_id, eval_json=o.eval_json, overwrite_card=o.overwrite_card,
                    base_model=o.base_model, said=o)
    sizes = [(f, len(p.card.encode()) if f == "README.md" else (folder / f).stat().st_size) for f in p.files]
    result = PushResult(repo_id=repo_id, files=sizes, skipped=p.skipped, card=p.card, card_origin=p.card_origin,
                        private=private, revision=revision, dry_run=o.dry_run, notes=p.notes,
                        large=sum(n for _, n in sizes) > LARGE_FOLDER_BYTES)
    if result.large:
        result.notes.append(f"above {fmt_bytes(LARGE_FOLDER_BYTES)}: the weights go up first, the rest and the card "
                            f"in a final commit" + ("" if importlib.util.find_spec("hf_xet") else
                                                    "; install hf_xet (pip install hf_xet) for an upload that "
                                                    "resumes where it stopped instead of starting again"))
    if o.dry_run:
        from huggingface_hub import get_token

        if not (token or get_token()):
            result.notes.append(f"no token found: a real push needs {o.key('token')}, HF_TOKEN or `hf auth login`")
        return result

    from huggingface_hub import HfApi

    api = HfApi(token=token)  # endpoint: HF_ENDPOINT, read by huggingface_hub itself
    message = o.commit_message or _default_message(folder, o.base_model)
    with hub_errors(repo_id, revision, api.endpoint, token, o):
        # private=None for a public push keeps an organisation's "private by default" policy.
        repo_url = with_retries(lambda: api.create_repo(repo_id, private=private or None, exist_ok=True,
                                                        repo_type="model"), "creating the repo")
        if private and not with_retries(lambda: api.repo_info(repo_id), "reading the repo").private:
            raise UptrainError(f"{repo_id} already exists and is public; {o.key('private')} does not change an "
                               f"existing repo. Make it private in its settings first, or drop {o.key('private')}")
        if revision and not revision.startswith("refs/"):
            with_retries(lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), "creating the branch")
        with staged(folder, p.files, p.card) as tmp:
            def upload(files, delete, msg):
                return with_retries(lambda: api.upload_folder(
                    repo_id=repo_id, folder_path=tmp, allow_patterns=[_pattern(f) for f in files],
                    delete_patterns=delete, revision=revision, commit_message=msg), "uploading")

            if result.large:
                weights = [f for f in p.files if f.endswith(".safetensors")]
                upload(weights, None, f"{message} (weights)")
                remote = with_retries(lambda: api.list_repo_files(repo_id, revision=revision), "listing the repo")
                stale = [f for f in remote if f not in p.files
                         and any(fnmatch.fnmatch(f, pat) for pat in DELETE_PATTERNS)]
                info = upload([f for f in p.files if f not in weights], [_pattern(f) for f in stale] or None, message)
            else:
                info = upload(p.files, DELETE_PATTERNS, message)
    result.url = str(repo_url).rstrip("/") + (f"/tree/{revision}" if revision else "")
    result.commit_url = getattr(info, "commit_url", None)
    return result

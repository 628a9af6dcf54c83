"""Run checkpoints in llama.cpp: the one adapter between uptrain and llama.cpp (GGUF).

    from uptrain.evaluation.llama_cpp import to_gguf, run_greedy

    gguf = to_gguf("out-gqa1", "out-gqa1.gguf")                 # llama.cpp's own convert_hf_to_gguf.py
    run = run_greedy(gguf, [[12, 7, …], …], new_tokens=32)
    run.tokens          # llama.cpp's greedy tokens, one list per prompt (the prompt ids as given: no BOS added)
    run.kv_cache_bytes  # the KV cache llama.cpp allocates for run.n_ctx tokens, as its log reports it

llama.cpp is a consumer uptrain is tested against, not a dependency: this module runs it in child processes
(the converter from a llama.cpp source tree, and .ci/llama_cpp/greedy.cpp built against its libllama by
.ci/build_llama_cpp.sh), and conversion never imports it. Where the tree is: `llama_cpp` arguments, else
UPTRAIN_LLAMA_CPP, else the build script's default folder.

The converter runs as users run it, with one exception that only applies to per-layer results
(DeciLMForCausalLM): llama.cpp's Deci converter reads the tokenizer as GPT-2-style BPE only when the vocabulary
has Llama 3's 128256 tokens and as a Llama SentencePiece-style one otherwise, so a byte-level BPE tokenizer of
another size (SmolLM2's) fails there ("Cannot find Llama BPE tokenizer"). `to_gguf` then takes the GPT-2 BPE
path, the one llama.cpp's other Llama-family converters take for the same tokenizer.

Remote-code results of GPT-NeoX and GPT-2 (GPTNeoXGQAForCausalLM, GPT2GQALMHeadModel: classes of uptrain's
modeling files, which llama.cpp's converter does not know) are written with llama.cpp's GPT-NeoX and GPT-2
converters plus head_count_kv, whose graphs already take fewer KV heads than query heads. OPT has no llama.cpp
architecture.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from uptrain.errors import UptrainError

VERSION = "0.3.36"  # the llama-cpp-python sdist whose vendored llama.cpp .ci/build_llama_cpp.sh builds
BUILD = ".ci/build_llama_cpp.sh"
GREEDY = "bin/uptrain-greedy"
# llama_kv_cache: size =   12.00 MiB (  4096 cells,   2 layers,  1/1 seqs), K (f16):    6.00 MiB, V (f16): …
KV_LOG = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells, +(\d+) layers")

# Run in the converter's process before llama.cpp's convert_hf_to_gguf.py (argv[1] its tree, argv[2] a pre-
# tokenizer name or "", then the converter's own arguments): the Deci tokenizer path of the module docstring, and
# optionally a pre-tokenizer for a BPE tokenizer llama.cpp's table does not know (a freshly trained one).
_BOOTSTRAP = r"""
import json, runpy, sys
tree, pre = sys.argv[1], sys.argv[2]
sys.argv = [tree + "/convert_hf_to_gguf.py"] + sys.argv[3:]
sys.path[0:0] = [tree, tree + "/gguf-py"]
from conversion import base, deci
def _deci_vocab(self, _orig=deci.DeciModel.set_vocab):
    tok = self.dir_model / "tokenizer.json"
    model = json.loads(tok.read_text())["model"] if tok.is_file() else {}
    if model.get("type") == "BPE" and not model.get("byte_fallback", False):
        return self._set_vocab_gpt2()
    return _orig(self)
deci.DeciModel.set_vocab = _deci_vocab
if pre:
    def _pre(self, tokenizer, _orig=base.TextModel.get_vocab_base_pre):
        try:
            return _orig(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = _pre
import conversion, torch
from conversion import gpt2, gptneox
def _gqa(parent, fused_per_kv_head):
    # uptrain's GQA classes for GPT-NeoX and GPT-2: llama.cpp's graphs take head_count_kv < head_count (the
    # fused q/k/v is [q; k; v] with K·head_dim rows each for k and v); GPT-NeoX's is fused per KV head
    # ([q … q k v] per KV head, uptrain's layout) and becomes llama.cpp's [q; k; v] here
    class GQA(parent):
        model_arch = parent.model_arch
        def set_gguf_parameters(self):
            super().set_gguf_parameters()
            self.gguf_writer.add_head_count_kv(self.hparams["num_key_value_heads"])
        def modify_tensors(self, data_torch, name, bid):
            if fused_per_kv_head and ".attention.query_key_value." in name:
                h, k = self.hparams["num_attention_heads"], self.hparams["num_key_value_heads"]
                qkv = data_torch.reshape(k, h // k + 2, self.hparams["hidden_size"] // h, -1)
                data_torch = torch.cat([qkv[:, :-2].reshape(-1, qkv.shape[-1]), qkv[:, -2].reshape(-1, qkv.shape[-1]),
                                        qkv[:, -1].reshape(-1, qkv.shape[-1])]).reshape(data_torch.shape)
                yield from base.TextModel.modify_tensors(self, data_torch, name, bid)
                return
            yield from super().modify_tensors(data_torch, name, bid)
    return GQA
def _neox_params(self, _orig=gptneox.GPTNeoXModel.set_gguf_parameters):
    # transformers 5 saves GPT-NeoX's rotary_pct as rope_parameters.partial_rotary_factor; llama.cpp reads the former
    rope = self.hparams.get("rope_parameters") or {}
    self.hparams.setdefault("rotary_pct", rope.get("partial_rotary_factor", self.hparams.get("partial_rotary_factor", 1.0)))
    return _orig(self)
gptneox.GPTNeoXModel.set_gguf_parameters = _neox_params
def _gpt2_params(self, _orig=gpt2.GPT2Model.set_gguf_parameters):
    self.hparams.setdefault("n_ctx", self.hparams.get("n_positions"))  # transformers 5 saves n_positions only
    return _orig(self)
gpt2.GPT2Model.set_gguf_parameters = _gpt2_params
from conversion import phi
def _phi_params(self, _orig=phi.Phi2Model.set_gguf_parameters):
    # llama.cpp's phi2 graph takes fewer KV heads; its converter does not write them
    _orig(self)
    if self.hparams.get("num_key_value_heads"):
        self.gguf_writer.add_head_count_kv(self.hparams["num_key_value_heads"])
phi.Phi2Model.set_gguf_parameters = _phi_params
for _name, _module, _parent, _fused in (("GPTNeoXGQAForCausalLM", "gptneox", gptneox.GPTNeoXModel, True),
                                        ("GPT2GQALMHeadModel", "gpt2", gpt2.GPT2Model, False)):
    conversion.TEXT_MODEL_MAP[_name] = _module
    base.ModelBase.register(_name)(_gqa(_parent, _fused))
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder .ci/build_llama_cpp.sh fills (src/: llama.cpp's tree, bin/: the greedy driver)."""
    if path is None:
        path = os.environ.get("UPTRAIN_LLAMA_CPP") or Path(
            os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "uptrain" / f"llama.cpp-{VERSION}"
    return Path(path)


def llama_cpp_available(path=None) -> bool:
    root = llama_cpp_dir(path)
    return (root / "src" / "convert_hf_to_gguf.py").is_file() and os.access(root / GREEDY, os.X_OK)


def _require(path) -> Path:
    root = llama_cpp_dir(path)
    if not llama_cpp_available(root):
        raise UptrainError(f"no llama.cpp build in {root} (its src/convert_hf_to_gguf.py and {GREEDY}): run "
                           f"{BUILD} from a clone of uptrain (about 10 min on two cores), or set UPTRAIN_LLAMA_CPP "
                           f"to the folder it printed")
    return root


def _converter_tree(path) -> Path:
    """A llama.cpp source tree (a clone, or the build folder's src/): where convert_hf_to_gguf.py is."""
    root = llama_cpp_dir(path)
    for tree in (root, root / "src"):
        if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "conversion").is_dir():
            return tree
    raise UptrainError(f"no llama.cpp converter in {root} (convert_hf_to_gguf.py and its conversion/ package): "
                       f"pass --llama-cpp with a llama.cpp clone, or run {BUILD}")


def to_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32", llama_cpp=None,
            pre_tokenizer: str | None = None) -> str:
    """Convert a Hugging Face folder to one GGUF file with llama.cpp's own convert_hf_to_gguf.py. outtype:
    f32 | f16 | bf16 | q8_0 (the converter's). pre_tokenizer: the llama.cpp pre-tokenizer name (e.g. "gpt-2")
    to write for a BPE tokenizer llama.cpp does not recognise; None leaves the converter's refusal standing."""
    tree = _converter_tree(llama_cpp)
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(tree), pre_tokenizer or "", str(folder),
           "--outtype", outtype, "--outfile", str(out)]
    existed = Path(out).exists()
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        if not existed:  # the converter may have begun the file: a failed conversion leaves nothing behind
            Path(out).unlink(missing_ok=True)
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise UptrainError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder}: " + " | ".join(tail))
    return str(out)


@dataclass
class LlamaCppRun:
    tokens: list[list[int]]  # greedy continuation of each prompt, exactly new_tokens long (EOS does not stop it)
    kv_cache_bytes: int  # llama.cpp's KV cache for n_ctx tokens, from its log (MiB with two decimals)
    n_ctx: int
    caches: list  # (bytes, cells, layers) per cache llama.cpp logs: one, or two with sliding-window layers
    log: str


def run_greedy(gguf: str | os.PathLike, prompts: list[list[int]], new_tokens: int = 32, n_ctx: int = 4096,
               cache_type: str = "f16", llama_cpp=None) -> LlamaCppRun:
    """llama.cpp's greedy tokens for the prompt ids (fed as they are: llama.cpp's own tools add a BOS to a text
    prompt, transformers does not for every tokenizer), in one child process, and the KV cache it allocates.
    cache_type: K and V in f16 (llama.cpp's default) or f32 (no f16 rounding where top logits are close)."""
    root = _require(llama_cpp)
    stdin = "".join(",".join(map(str, p)) + "\n" for p in prompts)
    proc = subprocess.run([str(root / GREEDY), str(gguf), str(n_ctx), str(new_tokens), cache_type], input=stdin,
                          capture_output=True, text=True, errors="replace", env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise UptrainError(f"llama.cpp could not run {gguf}: " + " | ".join(tail))
    caches = [(round(float(mib) * (1 << 20)), int(cells), int(layers)) for mib, cells, layers in
              KV_LOG.findall(proc.stderr)]
    if not caches:
        raise UptrainError(f"llama.cpp's log for {gguf} has no 'llama_kv_cache: size = … MiB' line")
    tokens = [[int(t) for t in line.split()] for line in proc.stdout.splitlines()]
    return LlamaCppRun(tokens, sum(c[0] for c in caches), n_ctx, caches, proc.stderr)


def gguf_metadata(gguf: str | os.PathLike, llama_cpp=None) -> dict:
    """The GGUF header's scalar and short array fields (gguf-py from the same tree), e.g. 'llama.attention.
    head_count_kv' — what llama.cpp's graph will read."""
    tree = _converter_tree(llama_cpp)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import gguf\n"
            "r = gguf.GGUFReader(sys.argv[2]); out = {}\n"
            "for k, f in r.fields.items():\n"
            "    if k.startswith('tokenizer.'): continue\n"
            "    v = f.contents()\n"
            "    out[k] = v if isinstance(v, (int, float, str)) or (isinstance(v, list) and len(v) < 256) else None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, str(tree / "gguf-py"), str(gguf)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UptrainError(f"cannot read {gguf}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)

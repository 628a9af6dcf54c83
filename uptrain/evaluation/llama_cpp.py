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
KV_LOG = re.compile(r"llama_kv_cache: size = +([0-9.]+) MiB \( *(\d+) cells")

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


def to_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f32", llama_cpp=None,
            pre_tokenizer: str | None = None) -> str:
    """Convert a Hugging Face folder to one GGUF file with llama.cpp's own convert_hf_to_gguf.py. outtype:
    f32 | f16 | bf16 | q8_0 (the converter's). pre_tokenizer: the llama.cpp pre-tokenizer name (e.g. "gpt-2")
    to write for a BPE tokenizer llama.cpp does not recognise; None leaves the converter's refusal standing."""
    root = _require(llama_cpp)
    cmd = [sys.executable, "-c", _BOOTSTRAP, str(root / "src"), pre_tokenizer or "", str(folder),
           "--outtype", outtype, "--outfile", str(out)]
    existed = Path(out).exists()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        if not existed:  # the converter may have begun the file: a failed conversion leaves nothing behind
            Path(out).unlink(missing_ok=True)
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise UptrainError(f"llama.cpp's convert_hf_to_gguf.py failed on {folder}: " + " | ".join(tail))
    return str(out)


@dataclass
class LlamaCppRun:
    tokens: list[list[int]]  # greedy continuation of each prompt, exactly new_tokens long (EOS does not stop it)
    kv_cache_bytes: int  # llama.cpp's KV cache for n_ctx cells, from its log (MiB with two decimals)
    n_ctx: int
    log: str


def run_greedy(gguf: str | os.PathLike, prompts: list[list[int]], new_tokens: int = 32, n_ctx: int = 4096,
               llama_cpp=None) -> LlamaCppRun:
    """llama.cpp's greedy tokens for the prompt ids (fed as they are: llama.cpp's own tools add a BOS to a text
    prompt, transformers does not for every tokenizer), in one child process, and the KV cache it allocates."""
    root = _require(llama_cpp)
    stdin = "".join(",".join(map(str, p)) + "\n" for p in prompts)
    proc = subprocess.run([str(root / GREEDY), str(gguf), str(n_ctx), str(new_tokens)], input=stdin,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        tail = [line for line in proc.stderr.splitlines() if line.strip()][-3:]
        raise UptrainError(f"llama.cpp could not run {gguf}: " + " | ".join(tail))
    found = KV_LOG.search(proc.stderr)
    if found is None:
        raise UptrainError(f"llama.cpp's log for {gguf} has no 'llama_kv_cache: size = … MiB' line")
    tokens = [[int(t) for t in line.split()] for line in proc.stdout.splitlines()]
    return LlamaCppRun(tokens, round(float(found.group(1)) * (1 << 20)), int(found.group(2)), proc.stderr)


def gguf_metadata(gguf: str | os.PathLike, llama_cpp=None) -> dict:
    """The GGUF header's scalar and short array fields (gguf-py from the same tree), e.g. 'llama.attention.
    head_count_kv' — what llama.cpp's graph will read."""
    root = _require(llama_cpp)
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import gguf\n"
            "r = gguf.GGUFReader(sys.argv[2]); out = {}\n"
            "for k, f in r.fields.items():\n"
            "    if k.startswith('tokenizer.'): continue\n"
            "    v = f.contents()\n"
            "    out[k] = v if isinstance(v, (int, float, str)) or (isinstance(v, list) and len(v) < 256) else None\n"
            "print(json.dumps(out))")
    proc = subprocess.run([sys.executable, "-c", code, str(root / "src" / "gguf-py"), str(gguf)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UptrainError(f"cannot read {gguf}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout)

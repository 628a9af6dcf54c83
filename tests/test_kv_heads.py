"""KV heads as one value (uptrain/kv_heads.py): parsing, a uniform list as one G, arithmetic, validation."""
import pytest

from uptrain.kv_heads import KVHeads


def test_text_and_values():
    assert KVHeads.parse("8") == KVHeads(uniform=8) and str(KVHeads.parse("8")) == "8"
    g = KVHeads.parse("8, 2,1,4")
    assert g.per_layer == (8, 2, 1, 4) and str(g) == "8,2,1,4" and g.value == (8, 2, 1, 4)
    assert g.at(1) == 2 and g.total(4) == 15 and g.as_json() == [8, 2, 1, 4]
    assert KVHeads.of([2, 2, 2]) == KVHeads.of(2) == KVHeads.parse("2,2,2")  # a uniform list is one G
    assert KVHeads.of(2).layers(3) == (2, 2, 2) and KVHeads.of(2).total(3) == 6 and KVHeads.of(2).at(7) == 2


@pytest.mark.parametrize("bad, says", [("0", "must be at least 1"), ("8,0", "every layer's G must be at least 1"),
                                       ("x", "is not a number of KV heads"), ("", "is not a number")])
def test_parse_refuses_with_the_reason(bad, says):
    with pytest.raises(ValueError, match=says):
        KVHeads.parse(bad)


def test_of_refuses_what_is_not_kv_heads():
    for bad in (True, 2.5, [], [1, "2"], None):
        with pytest.raises(ValueError):
            KVHeads.of(bad)


def test_a_unit_of_an_encoder_decoder_has_the_one_g():
    """`at` takes what the attention spec calls a unit (AttentionSpec.classify / units): a layer index, or (block,
    index) in an encoder-decoder, whose result has one G; per-layer G_l are per decoder layer only."""
    from uptrain.arch import SEQ2SEQ_SPECS

    t5 = SEQ2SEQ_SPECS["t5"]
    _, unit, _ = t5.classify("decoder.block.1.layer.1.EncDecAttention.k.weight")
    assert unit == ("cross", 1) and unit in t5.units({"num_layers": 2, "num_decoder_layers": None})
    assert KVHeads.of(2).at(unit) == 2
    with pytest.raises(ValueError, match="not a layer index"):
        KVHeads.of([8, 2]).at(unit)

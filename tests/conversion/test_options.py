"""ConvertOptions: one definition for the CLI, recipes and the Python API; errors in the caller's words."""
import pytest
from tiny_models import save, tiny_model

import uptrain
from uptrain.cli import main
from uptrain.conversion.options import ConvertOptions
from uptrain.errors import UptrainError
from uptrain.training.recipe import load_recipe

BAD = [  # (options, the words each caller should see: python, cli, recipe)
    ({"groups": 2, "grouping": "nearest"},
     ("unknown grouping='nearest'", "unknown --grouping nearest", "unknown model.convert.grouping: nearest")),
    ({"groups": 2, "method": "aligned", "calibration_tokens": 0},
     ("calibration_tokens=0: must be positive", "--calibration-tokens 0: must be positive",
      "model.convert.calibration_tokens: 0: must be positive")),
    ({"groups": 2, "method": "mean", "grouping": "similarity"},
     ("method='mean' takes no grouping", "--method mean takes no --grouping",
      "model.convert.method: mean takes no model.convert.grouping")),
]


@pytest.mark.parametrize("kw, words", BAD)
def test_errors_in_the_callers_words(kw, words, tmp_path):
    py, cli, recipe = words
    with pytest.raises(UptrainError, match=py):
        ConvertOptions.from_kwargs(**kw).check()
    with pytest.raises(UptrainError, match=cli):
        ConvertOptions.from_kwargs("cli", **kw).check()
    with pytest.raises(UptrainError, match=recipe):
        load_recipe({"model": {"path": "x", "convert": kw}, "budget": {"max_steps": 1}})


def test_unknown_option_suggests_the_name():
    with pytest.raises(UptrainError, match="unknown conversion option calibraton_tokens; did you mean "
                                           "calibration_tokens"):
        ConvertOptions.from_kwargs(groups=2, calibraton_tokens=5)
    with pytest.raises(UptrainError, match="unknown key 'model.convert.calibraton_tokens' in the recipe; did you "
                                           "mean model.convert.calibration_tokens"):
        load_recipe({"model": {"path": "x", "convert": {"groups": 2, "calibraton_tokens": 5}},
                     "budget": {"max_steps": 1}})


def test_recipe_takes_every_cli_option():
    """Every flag of `uptrain convert` that describes the conversion is a key of a recipe's model.convert."""
    import dataclasses

    from uptrain.cli import build_parser

    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    flags = {a.dest for a in convert._actions} - {"help", "src", "out", "overwrite", "revision", "quiet"}
    assert flags == {f.name for f in dataclasses.fields(ConvertOptions)}
    r = load_recipe({"model": {"path": "x", "convert": {"groups": 2, "method": "aligned", "grouping": "similarity",
                                                        "calibration": "my.txt", "calibration_tokens": 4096,
                                                        "seed": 3}},
                     "budget": {"max_steps": 1}})
    assert r.model.convert.calibration_tokens == 4096 and r.model.convert.grouping == "similarity"


def test_groups_in_the_callers_words(tmp_path, tokenizer, capsys):
    src = save(tiny_model(), tmp_path / "src", tokenizer)
    with pytest.raises(UptrainError, match="^groups 3 does not divide the source's 8 KV heads"):
        uptrain.convert(src, tmp_path / "o", groups=3, progress=False)
    assert main(["convert", src, str(tmp_path / "o"), "--groups", "3"]) == 2
    assert "--groups 3 does not divide the source's 8 KV heads" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()

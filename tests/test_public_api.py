"""The public API (uptrain/__init__.py): every exported name resolves, what type checkers see is what runs,
and `import uptrain` stays cheap (no torch, no transformers) until a call needs them."""
import ast
import pathlib
import subprocess
import sys

import uptrain

INIT = pathlib.Path(uptrain.__file__)


def test_every_exported_name_resolves_and_is_listed():
    for name in uptrain.__all__:
        assert getattr(uptrain, name) is not None, name
    assert set(uptrain.__all__) <= set(dir(uptrain))
    assert callable(uptrain.convert) and callable(uptrain.evaluate) and callable(uptrain.train)


def test_type_checkers_see_every_lazy_name():
    """The `if TYPE_CHECKING:` imports name exactly the lazy names, each from the module the lazy table
    says, so an IDE's view and the run-time object are the same thing."""
    tree = ast.parse(INIT.read_text(encoding="utf-8"))
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", "") == "TYPE_CHECKING")
    seen = {a.asname or a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert set(seen) == set(uptrain._API)
    for name, module in seen.items():
        assert getattr(uptrain, name) is getattr(__import__(module, fromlist=[name]), name), name


def test_import_is_cheap_and_the_package_is_typed():
    code = "import sys, uptrain; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
    assert (INIT.parent / "py.typed").is_file()


def test_an_unknown_name_is_an_attribute_error():
    try:
        uptrain.no_such_thing
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")

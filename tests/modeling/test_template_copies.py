"""Copies that must stay copies. Each modeling template ships alone next to converted weights (imports: torch and
transformers only), so it cannot import a shared helper; the helpers it shares are copied, and marked as
transformers marks its copies: `# Copied from uptrain.modeling.<module>.<name>` on the line above. This test is
transformers' `utils/check_copies.py` for them: a marked copy must be its original, character for character."""
import ast
import re
from pathlib import Path

import pytest

from repo_paths import REPO_PATH

FOLDER = REPO_PATH / "uptrain" / "modeling"
MARK = re.compile(r"^# Copied from uptrain\.modeling\.(\w+)\.(\w+)\s*$")


def definitions(path: Path) -> dict[str, str]:
    """Top-level function and class sources of a file, by name."""
    text = path.read_text(encoding="utf-8")
    tree = ast.parse(text)
    return {n.name: ast.get_source_segment(text, n) for n in tree.body
            if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def marked_copies(path: Path) -> list[tuple[str, str, str]]:
    """(name defined below the mark, original module, original name) for every mark in a file."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if m:
            below = re.match(r"(?:def|class) (\w+)", lines[i + 1]) if i + 1 < len(lines) else None
            assert below, f"{path.name}:{i + 1}: a '# Copied from' mark must sit right above a def or class"
            out.append((below.group(1), m.group(1), m.group(2)))
    return out


TEMPLATES = sorted(FOLDER.glob("modeling_*.py"))
COPIES = [(p, *c) for p in TEMPLATES for c in marked_copies(p)]


def test_the_shared_helpers_are_marked():
    """Every template that defines repeat_kv or the_cache either is the original or marks its copy."""
    marked = {(p.name, name) for p, name, *_ in COPIES}
    originals = {(o + ".py", n) for _, _, o, n in COPIES}
    for p in TEMPLATES:
        for name in ("repeat_kv", "the_cache"):
            if name in definitions(p):
                assert (p.name, name) in marked | originals, f"{p.name} defines {name} without a '# Copied from' mark"
    assert COPIES


@pytest.mark.parametrize("path,name,module,original", COPIES, ids=[f"{p.stem}.{n}" for p, n, *_ in COPIES])
def test_a_marked_copy_is_its_original(path, name, module, original):
    source = FOLDER / f"{module}.py"
    assert source.is_file(), f"{path.name}: '# Copied from' names {module}, which is not a template"
    want = definitions(source).get(original)
    assert want is not None, f"{module}.py has no {original}"
    assert definitions(path)[name] == want.replace(f"def {original}(", f"def {name}(", 1), (
        f"{path.name}'s {name} has drifted from {module}.{original}: copy the original again")


def test_the_checker_sees_a_drifted_copy(tmp_path):
    a = "def f(x):\n    return x + 1\n"
    b = "# Copied from uptrain.modeling.a.f\ndef f(x):\n    return x + 2\n"
    (tmp_path / "a.py").write_text(a)
    (tmp_path / "b.py").write_text(b)
    [(name, module, original)] = marked_copies(tmp_path / "b.py")
    assert definitions(tmp_path / "b.py")[name] != definitions(tmp_path / f"{module}.py")[original]

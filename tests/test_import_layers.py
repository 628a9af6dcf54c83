"""The package's layers (CONTRIBUTING.md, "Layers"): a module imports only from its own layer or below, so the
math never depends on I/O, I/O never on pipelines, pipelines never on publishing or the entry points."""
import ast
import pathlib

from repo_paths import REPO_PATH

ROOT = REPO_PATH / "uptrain"

# Bottom to top. A module belongs to the layer of the longest listed prefix of its dotted name.
LAYERS = [
    # uptrain.modeling imports nothing of uptrain (its templates travel with checkpoints: see the test below),
    # so every layer may ask it which code is ours
    ("base", ["uptrain.errors", "uptrain.version", "uptrain.modeling", "uptrain.options"]),
    # pure functions and text (files: the atomic-write primitive everything writes through)
    ("math, formats and files", ["uptrain.pooling", "uptrain.merging", "uptrain.span_corruption", "uptrain.report",
                                 "uptrain.kv_heads", "uptrain.files"]),
    # what reads or writes checkpoints, records, data sets (datasets / the Hub / local files) and images
    ("records, data and I/O", ["uptrain.record", "uptrain.hf", "uptrain.checkpoint", "uptrain.data", "uptrain.plots"]),
    ("model knowledge", ["uptrain.arch"]),
    # calibration (the layer pass) and the streaming converter share a layer: the converter drives calibration
    # through its method interface, calibration reads the conversion's options and context
    ("conversion, calibration and evaluation", ["uptrain.conversion", "uptrain.calibration", "uptrain.evaluation"]),
    ("training (converts, then evaluates while it trains)", ["uptrain.training"]),
    ("publishing", ["uptrain.publishing"]),
    ("entry points", ["uptrain", "uptrain.api", "uptrain.cli", "uptrain.__main__", "uptrain.miniature"]),
]


def layer_of(module: str) -> int:
    best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
                if module == p or module.startswith(p + ".")), default=None)
    assert best is not None, f"{module} is in no layer: add it to LAYERS and to CONTRIBUTING.md's tree"
    return best[1]


def module_name(path: pathlib.Path) -> str:
    parts = ["uptrain", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every uptrain module the code `source` of `module` imports, at the top or inside a function."""
    out = set()
    package = module if is_package else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "uptrain"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] == "uptrain":  # `from uptrain import hf` imports the module uptrain.hf
                subs = [f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")]
                out |= set(subs) if len(subs) == len(node.names) else {base}
    return out


def _is_module(dotted: str) -> bool:
    rel = pathlib.Path(*dotted.split(".")[1:])
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def test_every_module_has_a_layer():
    for path in ROOT.rglob("*.py"):
        layer_of(module_name(path))


def upward_imports(module: str, source: str, is_package: bool = False) -> list[str]:
    me = layer_of(module)
    return [f"{module} ({LAYERS[me][0]}) imports {other} ({LAYERS[layer_of(other)][0]})"
            for other in sorted(imports(source, module, is_package)) if layer_of(other) > me]


def test_no_module_imports_from_a_layer_above_it():
    wrong = [line for path in sorted(ROOT.rglob("*.py"))
             for line in upward_imports(module_name(path), path.read_text(encoding="utf-8"),
                                        path.name == "__init__.py")]
    assert not wrong, "\n".join(wrong)


# What reading or writing looks like in source: libraries that load or save, and the calls that open files.
IO_MODULES = {"datasets", "huggingface_hub", "safetensors", "matplotlib", "pathlib", "shutil", "glob", "os"}
IO_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "savefig", "load_dataset", "save", "load"}


def io_in(source: str) -> list[str]:
    """The I/O libraries `source` imports and the file-opening calls it makes."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
        found += [f"import {n}" for n in names if n.split(".")[0] in IO_MODULES]
        if isinstance(node, ast.Call):
            f = node.func
            name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if name in IO_CALLS:
                found.append(f"{name}() on line {node.lineno}")
    return found


def test_the_pure_layer_reads_and_writes_nothing():
    """Below the records-and-I/O layer, only uptrain.files touches the disk (the atomic writes everything goes
    through): math and formats neither read nor write, so they are tested with tensors and strings alone."""
    pure = [p for p in LAYERS[1][1] if p != "uptrain.files"]
    found = {m: io_in((ROOT / f"{m.split('.', 1)[1]}.py").read_text(encoding="utf-8")) for m in pure}
    assert not {m: f for m, f in found.items() if f}, found
    assert io_in("import datasets\nopen('x')\n") == ["import datasets", "open() on line 2"]  # the check can fail
    # why uptrain.data is in the I/O layer: its corpora and its block cache read and write files
    assert io_in((ROOT / "data" / "corpora.py").read_text(encoding="utf-8"))
    assert io_in((ROOT / "data" / "cache.py").read_text(encoding="utf-8"))


def test_the_checker_sees_a_violation():
    """Upward imports anywhere in a module (inside a function too, relative or `from uptrain import x`)."""
    assert upward_imports("uptrain.pooling", "def f():\n    from uptrain.hf import resolve\n")
    assert upward_imports("uptrain.evaluation.compare", "from uptrain import publishing\n")
    assert upward_imports("uptrain.training.loop", "from ..cli import main\n")
    assert not upward_imports("uptrain.training.loop", "from uptrain.evaluation.quality import perplexity\n")


def test_modeling_files_import_only_torch_and_transformers():
    """The templates in uptrain/modeling/ are copied next to converted weights and loaded with
    trust_remote_code=True where uptrain is not installed: torch and transformers only. The registry
    (__init__) reads them with the standard library alone."""
    import sys

    folder = ROOT / "modeling"
    templates = sorted(folder.glob("modeling_*.py"))
    assert templates
    for path in [*templates, folder / "__init__.py"]:
        allowed = {"torch", "transformers"} if path.name != "__init__.py" else set(sys.stdlib_module_names)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tops = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        tops |= {("." if n.level else "") + (n.module or "").split(".")[0]
                 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        tops.discard("__future__")
        assert tops <= allowed, f"{path.name} imports {sorted(tops - allowed)}"


def test_contributing_names_every_module():
    """CONTRIBUTING.md's tree is the map of the code: every top-level module and package of uptrain/ is in it, and
    every module of a package by its file name (modeling/'s templates are named by architecture)."""
    text = (REPO_PATH / "CONTRIBUTING.md").read_text(encoding="utf-8")
    tree = text.split("```\nuptrain/\n", 1)[1].split("```", 1)[0]
    missing = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if len(rel.parts) == 1:
            missing += [] if rel.name in tree else [str(rel)]
        elif f"{rel.parts[0]}/" not in tree:
            missing.append(str(rel))
        elif rel.parts[0] != "modeling" and rel.name != "__init__.py" and rel.name not in tree:
            missing.append(str(rel))
    assert not missing, f"not in CONTRIBUTING.md's tree: {missing}"

"""The documentation tells the truth about the repository: links and anchors resolve, every `uptrain …` command
shown parses with the real CLI and passes only flags that the tests pass too (or says what it needs that a test
machine lacks), every benchmark command names a script and its flags, and generated tables are up to date."""
import contextlib
import functools
import glob
import io
import json
import os
import re
import shlex
import sys

import pytest

from repo_paths import REPO
DOCS = ["README.md", "CONTRIBUTING.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(f"{REPO}/docs/*.md"))]
FENCE = re.compile(r"^( *)(```+)([^\n]*)\n(.*?)^\1\2 *$", re.M | re.S)
# A command that needs what a test machine lacks says so in its comment: `# needs the Hub`, `# needs GPUs`.
NEEDS = re.compile(r"#.*\bneeds\b")


def read(doc: str) -> str:
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        return f.read()


def outside_code(text: str) -> str:
    """The text outside fenced code blocks and HTML comments (notes to maintainers)."""
    return re.sub(r"<!--.*?-->", "", FENCE.sub("", text), flags=re.S)


def prose(text: str) -> str:
    """The text outside fenced code blocks, comments and inline code spans."""
    return re.sub(r"(`+)[^`].*?\1", "", outside_code(text), flags=re.S)


def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, bodies dedented."""
    out = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        body = "\n".join(line[indent:] for line in m.group(4).splitlines())
        out.append((m.group(3).strip(), body))
    return out


# ------------------------------------------------------------------------------------------ links and anchors
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text lowercased, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`([^`]*)`", r"\1", heading)  # code spans keep their text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links keep theirs
    text = re.sub(r"[*_]{1,3}([^*_]+)[*_]{1,3}", r"\1", text)  # emphasis
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(doc: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", outside_code(read(doc)), re.M):
        s = slug(m.group(1))
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links(doc: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)(?: \"[^\"]*\")?\)", prose(read(doc)))]


def test_the_slug_rule_matches_github():
    assert slug("`uptrain demo --arch t5`: the paper's own setting, in miniature") == \
        "uptrain-demo---arch-t5-the-papers-own-setting-in-miniature"
    assert slug("Does it work for Pythia? The demo's pipeline on a GPT-NeoX") == \
        "does-it-work-for-pythia-the-demos-pipeline-on-a-gpt-neox"
    assert slug("Refinement: local reconstruction") == "refinement-local-reconstruction"


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_and_anchor_resolves(doc):
    broken = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: …
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), path)) if path else os.path.join(REPO, doc)
        if not os.path.exists(full):
            broken.append(f"{target}: no such file")
        elif anchor and full.endswith(".md") and anchor not in anchors(os.path.relpath(full, REPO)):
            broken.append(f"{target}: no heading with that anchor")
    assert not broken, f"{doc}: " + "; ".join(broken)


def test_the_checker_sees_a_broken_link(tmp_path, monkeypatch):
    (tmp_path / "docs").mkdir()
    (tmp_path / "a.md").write_text("# Top\n\n[ok](docs/b.md#there) [bad](docs/b.md#nowhere) [gone](c.md)\n"
                                   "`[not a link](x.md)`\n```\n[nor this](y.md)\n```\n")
    (tmp_path / "docs" / "b.md").write_text("## There\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    with pytest.raises(AssertionError, match=r"docs/b.md#nowhere: no heading.*c.md: no such file"):
        test_every_relative_link_and_anchor_resolves("a.md")


# ------------------------------------------------------------------------------------------ what the pages speak of
# User pages say what the product does and what was measured; how the work went belongs in CHANGELOG.md.
HISTORY = re.compile(r"\bthe session\b|\bwas lent\b|\bthe issue(?:'s)?(?!\w)|\bissue \d+|\bthe bar\b|"
                     r"\bgoals? (?:is |are )?not met\b|\bran out of time\b|\btime there was\b|"
                     r"\bbefore this (?:fix|version|change)\b|\bprototype|\bthe then default\b|"
                     r"\bwhen this was written\b|\bearlier runs?\b|\bof that commit\b", re.I)


def history_in(doc: str) -> list[str]:
    return [f"{doc}:{n}: {m.group(0)!r}" for n, line in enumerate(read(doc).splitlines(), 1)
            for m in HISTORY.finditer(line)]


@pytest.mark.parametrize("doc", DOCS)
def test_user_pages_do_not_tell_how_they_were_made(doc):
    assert not history_in(doc), "history belongs in CHANGELOG.md: " + "; ".join(history_in(doc))


def test_the_history_check_sees_a_session_story(tmp_path, monkeypatch):
    (tmp_path / "a.md").write_text("Measured on 2 cores.\nNot scored: the session ran out of time.\n"
                                   "The issue's bar of 1.2× is not reached. Before this fix it crashed.\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    assert [h.split(": ", 1)[1] for h in history_in("a.md")] == [
        "'the session'", "'ran out of time'", "\"The issue's\"", "'Before this fix'"]


# ------------------------------------------------------------------------------------------ troubleshooting
def normalised(message: str, folder: str) -> str:
    """An error line with what differs between machines made alike: the exception a library raised, paths, sizes."""
    message = message.replace(folder, "/models")
    message = re.sub(r"\((\w+Error): .*?\)\. ", "(ERROR). ", message)
    message = re.sub(r"(?<![\w'])/[\w./-]+", "PATH", message)
    return re.sub(r"\d[\d.,]*( ?[KMG]i?B| B)?", "N", message)


def test_the_troubleshooting_messages_are_the_ones_uptrain_prints(tmp_path, monkeypatch, tokenizer):
    """Every error line docs/troubleshooting.md quotes is what the CLI prints for that mistake (paths, sizes and
    the Hub library's own exception aside)."""
    import shutil

    from tiny_models import save, tiny_model

    from uptrain.cli import main

    def said(*argv) -> str:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            assert main([str(a) for a in argv]) == 2
        return normalised(err.getvalue().strip().splitlines()[-1], str(tmp_path))

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save(tiny_model("llama", layers=1), tmp_path / "my-llama")
    save(tiny_model("qwen3", layers=1), tmp_path / "qwen3", tokenizer=tokenizer)
    printed = {said("convert", "meta-llama/Llama-2-7b-hf", "out", "--groups", "8"),
               said("convert", tmp_path / "my-llama", "out", "--groups", "2", "--method", "aligned"),
               said("eval", "my-llama"),
               said("convert", "qwen3", "out", "--groups", "2", "--method", "aligned"),
               said("convert", "my-llama", "out", "--groups", "3")}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    printed.add(said("convert", "my-llama", "out", "--groups", "2"))
    from uptrain.evaluation.serving import vllm_available

    if not vllm_available():
        printed.add(said("eval", "qwen3", "--engine", "vllm"))
    shown = [line for _, body in code_blocks(read("docs/troubleshooting.md")) for line in body.splitlines()
             if ": error: " in line]
    assert len(shown) >= 7
    missing = [line for line in shown if normalised(line, str(tmp_path)) not in printed
               and not (vllm_available() and "needs vLLM" in line)]
    assert not missing, f"docs/troubleshooting.md quotes messages uptrain does not print: {missing}"


# ------------------------------------------------------------------------------------------ commands
def commands(doc: str) -> list[tuple[str, bool]]:
    """(command line, marked as needing the Hub / GPUs) of every shell line the doc shows: lines of bash blocks
    and `$ ` lines of any block; continuation lines joined."""
    out = []
    for lang, body in code_blocks(read(doc)):
        if lang not in ("bash", "sh", "console", ""):
            continue
        lines = body.replace("\\\n", " ").splitlines()
        for line in lines:
            if lang == "" and not line.startswith("$ "):
                continue
            line = line.removeprefix("$ ").strip()
            if line and not line.startswith("#"):
                out.append((line, bool(NEEDS.search(line))))
    return out


def argv_of(line: str) -> list[str]:
    """The words of a shell line, comments dropped and optional parts ([--private]) kept without brackets."""
    return shlex.split(line.replace("[", " ").replace("]", " ").replace("&&", " && "), comments=True)


def uptrain_argv(words: list[str]) -> list[str] | None:
    """The arguments of `uptrain …`, `python -m uptrain …` or `accelerate launch … -m uptrain …`."""
    for i, w in enumerate(words):
        if w == "uptrain" and (i == 0 or words[i - 1] in ("-m", "&&")):
            rest = words[i + 1:]
            return rest[:rest.index("&&")] if "&&" in rest else rest
    return None


def all_commands():
    return [(doc, line, needs) for doc in DOCS for line, needs in commands(doc)]


def subparsers():
    import argparse

    from uptrain.cli import build_parser

    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@functools.lru_cache(maxsize=1)
def flags_the_tests_pass() -> frozenset[str]:
    """Every "--flag" string literal in the tests and benchmarks: the flags some test or benchmark passes."""
    found = set()
    for path in glob.glob(os.path.join(REPO, "tests", "**", "*.py"), recursive=True):
        with open(path, encoding="utf-8") as f:
            found |= set(re.findall(r"[\"'](--[a-z][a-z0-9-]*)", f.read()))
    return frozenset(found)


def plan_example() -> tuple[str, list[str]]:
    """docs/training.md's worked `uptrain plan` example: the command and the lines it prints."""
    block = next(body for _, body in code_blocks(read("docs/training.md")) if body.startswith("$ uptrain plan"))
    line, *shown = block.splitlines()
    return line.removeprefix("$ "), shown


UPTRAIN = [(doc, line, needs) for doc, line, needs in all_commands() if uptrain_argv(argv_of(line)) is not None]


def test_the_docs_show_uptrain_commands():
    assert len(UPTRAIN) >= 20 and {uptrain_argv(argv_of(line))[0] for _, line, _ in UPTRAIN} >= {
        "inspect", "convert", "train", "eval", "push", "demo", "plan"}


@pytest.mark.parametrize("doc, line, needs", UPTRAIN, ids=[f"{d}:{line[:60]}" for d, line, _ in UPTRAIN])
def test_every_uptrain_command_parses_with_the_real_cli(doc, line, needs):
    from uptrain.cli import build_parser

    argv = uptrain_argv(argv_of(line))
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args, extra = build_parser().parse_known_args(argv)
    except SystemExit as e:  # argparse refuses, or --help / --help-recipe printed and left (status 0)
        assert e.code == 0, f"{line}\n{err.getvalue()}"
        return
    # what main() accepts beyond the parser: KEY=VALUE overrides after an option
    assert all("=" in x and not x.startswith("-") for x in extra) and (not extra or hasattr(args, "overrides")), \
        f"{line}: unrecognised {extra}"


@pytest.mark.parametrize("doc, line, needs", UPTRAIN, ids=[f"{d}:{line[:60]}" for d, line, _ in UPTRAIN])
def test_every_flag_shown_is_one_a_test_passes(doc, line, needs):
    """A command either needs what a test machine lacks (and says so), or passes only flags that a test passes."""
    if needs or line == plan_example()[0]:  # the plan example is run below
        return
    flags = {w.split("=")[0] for w in uptrain_argv(argv_of(line)) if w.startswith("--")}
    assert flags <= flags_the_tests_pass(), (f"{doc}: `{line}` shows {sorted(flags - flags_the_tests_pass())}, which no test "
                                     f"passes: test it, or mark the command `# needs …`")


def inline_uptrain(doc: str) -> list[str]:
    """`uptrain SUBCOMMAND …` in inline code spans of the prose."""
    return [m.group(1) for m in re.finditer(r"`(uptrain [a-z][^`]*)`", outside_code(read(doc)))]


@pytest.mark.parametrize("doc", DOCS)
def test_inline_uptrain_commands_name_real_subcommands_and_flags(doc):
    subs = subparsers()
    bad = []
    for code in inline_uptrain(doc):
        words = argv_of(code)
        if len(words) < 2 or words[1].startswith("-"):
            continue  # `uptrain --version`
        sub = subs.get(words[1])
        if sub is None:
            if words[1][0].isalpha() and words[1].islower() and "." not in words[1]:
                bad.append(f"`{code}`: no subcommand {words[1]}")
            continue
        unknown = [w.split("=")[0] for w in words[2:] if w.startswith("--") and
                   w.split("=")[0] not in sub._option_string_actions]
        bad += [f"`{code}`: {sub.prog} has no {u}" for u in unknown]
    assert not bad, "; ".join(bad)


# ------------------------------------------------------------------------------------------ benchmarks, paths
BENCH = [(doc, line) for doc, line, _ in all_commands() if "tests/benchmarks/" in line]


def test_every_benchmark_has_a_row_in_benchmarks_md():
    shown = {os.path.basename(w) for _, line in BENCH for w in argv_of(line) if w.startswith("tests/benchmarks/")}
    shown |= set(re.findall(r"`(bench_[a-z0-9_]+\.py)", read("docs/benchmarks.md")))
    scripts = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "tests", "benchmarks", "bench_*.py"))}
    assert scripts and scripts <= shown, f"benchmarks missing from docs/benchmarks.md: {sorted(scripts - shown)}"


def bench_lines():
    """Benchmark commands in code blocks and in the inline code of benchmarks.md's table."""
    inline = re.findall(r"`(python tests/benchmarks/[^`]+)`", outside_code(read("docs/benchmarks.md")))
    return [line for _, line in BENCH] + inline


@pytest.mark.parametrize("line", bench_lines())
def test_every_benchmark_command_names_a_script_and_its_flags(line):
    words = argv_of(line)
    script = next(w for w in words if w.startswith("tests/benchmarks/"))
    path = os.path.join(REPO, script)
    assert os.path.isfile(path), script
    with open(path, encoding="utf-8") as f:
        source = f.read()
    for shared in re.findall(r"^from (bench_[a-z0-9_]+) import", source, re.M):  # flags a sibling's parser adds
        with open(os.path.join(os.path.dirname(path), shared + ".py"), encoding="utf-8") as f:
            source += f.read()
    known = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", source))
    # the first positional argument's choices, or the subcommands: what the first plain word must be
    first = re.search(r"add_argument\(\s*\"[a-z_]+\",\s*choices=\(([^)]*)\)", source)
    positional = {c.strip().strip("\"'") for c in first.group(1).split(",")} if first else set()
    positional |= set(re.findall(r"add_parser\(\s*\"([a-z]+)\"", source))
    flags = [w for w in words[words.index(script) + 1:] if w.startswith("--")]
    assert set(flags) <= known, f"{script} has no {sorted(set(flags) - known)}"
    words_after = [w for w in words[words.index(script) + 1:] if not w.startswith("-")]
    if words_after and re.fullmatch(r"[a-z]+", words_after[0]) and positional:
        assert words_after[0] in positional, f"{script}: {words_after[0]} is not one of {sorted(positional)}"


def test_repository_paths_in_commands_exist():
    missing = []
    for doc, line, _ in all_commands():
        for w in argv_of(line):
            for part in w.split("="):
                if re.match(r"^(recipes|tests|notebooks|docs|uptrain)/", part) and not glob.glob(
                        os.path.join(REPO, part)):
                    missing.append(f"{doc}: {part}")
    assert not missing, missing


# ------------------------------------------------------------------------------------------ generated content
def test_the_recipe_keys_table_in_training_md_is_up_to_date():
    from uptrain.training.recipe_keys import MARKDOWN_END, MARKDOWN_START, render

    text = read("docs/training.md")
    start, end = text.index(MARKDOWN_START), text.index(MARKDOWN_END) + len(MARKDOWN_END)
    assert text[start:end] + "\n" == render("markdown"), (
        "docs/training.md's recipe keys are stale: replace the block between its two markers with the output of "
        "`uptrain train --help-recipe markdown`")


def generated_block(doc: str, start: str, end: str) -> str:
    """The text of `doc` from the line `start` to the line `end`, both included."""
    text = read(doc)
    assert start in text and end in text, f"{doc} has no block between {start!r} and {end!r}"
    return text[text.index(start):text.index(end) + len(end)] + "\n"


def options_tables():
    from uptrain.conversion.options import ConvertOptions
    from uptrain.evaluation.options import EvalOptions

    return [("docs/convert.md", ConvertOptions, "convert"), ("docs/evaluate.md", EvalOptions, "eval")]


@pytest.mark.parametrize("doc, cls, command", options_tables(), ids=["convert", "eval"])
def test_the_options_tables_are_generated_from_the_options_dataclasses(doc, cls, command):
    """Every flag, its default and its sentence as the code defines them (uptrain/options.py: options_markdown)."""
    from uptrain.options import markers, options_markdown

    assert generated_block(doc, *markers(command)) == options_markdown(cls, command), (
        f"{doc}'s table of `uptrain {command}` options is stale: replace the block between its two markers with "
        f"the output of python -c \"from uptrain.options import options_markdown; from {cls.__module__} import "
        f"{cls.__name__}; print(options_markdown({cls.__name__}, '{command}'), end='')\"")


def test_a_planted_drift_in_a_default_fails_the_options_check(monkeypatch):
    import dataclasses

    from uptrain.conversion.options import ConvertOptions

    field = next(f for f in dataclasses.fields(ConvertOptions) if f.name == "max_shard_size")
    drifted = dataclasses.make_dataclass("ConvertOptions", [("max_shard_size", str, dataclasses.field(
        default="2GB", metadata=field.metadata))], bases=(ConvertOptions,))
    with pytest.raises(AssertionError, match="table of `uptrain convert` options is stale"):
        test_the_options_tables_are_generated_from_the_options_dataclasses("docs/convert.md", drifted, "convert")


def demo_pages_agree_with(results: dict) -> None:
    """README.md and docs/demo.md hold what published() writes from `results` (a demo run's results.json)."""
    from uptrain.miniature.report import PUBLISHED, published, published_markers

    for doc, page in (("README.md", "readme"), ("docs/demo.md", "demo")):
        assert generated_block(doc, *published_markers(page)) == published(results, page), (
            f"{doc}'s demo figures are not those of {PUBLISHED}: replace the block between its markers with the "
            f"output of python -c \"import json; from uptrain.miniature.report import published; "
            f"print(published(json.load(open('{PUBLISHED}')), '{page}'), end='')\"")


def test_the_demo_figures_are_those_of_the_committed_run():
    """The README's demo table, demo.md's table and findings, and the time the docs and `uptrain demo --help`
    give for a run come from the results.json of the run whose plot the pages show."""
    from uptrain.miniature.report import PUBLISHED
    from uptrain.miniature.sizes import SECONDS

    results = json.loads(read(PUBLISHED))
    demo_pages_agree_with(results)
    folder = os.path.dirname(os.path.join(REPO, PUBLISHED))
    assert os.path.isfile(os.path.join(folder, "quality_vs_cost.png"))
    assert "docs/demo-run/quality_vs_cost.png" in read("README.md")
    assert results["threads"] == 1 and abs(SECONDS[("llama", False)] - results["cpu_time_s"]) < 30


def test_a_planted_drift_in_the_demo_figures_fails():
    from uptrain.miniature.report import PUBLISHED

    results = json.loads(read(PUBLISHED))
    results["rows"][0]["ppl_step0"] *= 1.01
    with pytest.raises(AssertionError, match="demo figures are not those of"):
        demo_pages_agree_with(results)


def test_the_plan_example_prints_what_training_md_shows(capsys, monkeypatch):
    from uptrain.cli import main

    line, shown = plan_example()
    monkeypatch.chdir(REPO)  # the example's paths are the repository's
    assert main(uptrain_argv(argv_of(line))) == 0
    assert capsys.readouterr().out.splitlines() == shown


def test_every_recipe_key_is_documented():
    from uptrain.training.recipe_keys import recipe_keys

    keys = recipe_keys()
    assert {"optim.lr", "model.convert.groups", "data.sources[].weight", "data.streaming", "push_to_hub"} <= {
        k.key for k in keys}
    assert not [k.key for k in keys if len(k.help) < 8], "a recipe key without its sentence"


def test_help_recipe_prints_the_keys_without_a_recipe(capsys):
    from uptrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--help-recipe"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "optim.lr  (number; default 0.0001)" in out and "model.convert.method" in out


def test_the_readme_and_demo_md_state_the_measured_demo_time():
    from uptrain.miniature.sizes import took

    assert took("llama") in read("README.md")
    demo = " ".join(read("docs/demo.md").split())
    assert all(took(arch, quick) in demo for arch in ("llama", "t5") for quick in (False, True))


def test_the_readme_path_to_vllm_runs_offline_on_a_tiny_stand_in(tmp_path, monkeypatch, tokenizer, capsys):
    """The README's worked example, its offline commands as written, with a tiny MHA Llama where
    tests/benchmarks/build_real_model.py leaves SmolLM2's MHA expansion. The lines that need PyPI, the Hub or vLLM
    say so, and are the only ones not run here."""
    import torch
    from tiny_models import save, tiny_model

    from uptrain.cli import main

    text = read("README.md")
    hub = [line for line in text.splitlines() if "HuggingFaceTB/" in line and line.startswith("uptrain ")]
    assert hub and all(NEEDS.search(line) and "the Hub" in line for line in hub)
    block = next(body for lang, body in code_blocks(text) if "build_real_model.py" in body)
    lines = [line.strip() for line in block.splitlines() if line.strip()]
    skipped = [line.split()[0] + " " + line.split()[1] for line in lines if NEEDS.search(line)]
    assert skipped == ["python tests/benchmarks/build_real_model.py", "vllm serve"]
    save(tiny_model("llama"), tmp_path / "real" / "smollm2-135m-mha", tokenizer=tokenizer)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPTRAIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for line in lines:
            if not NEEDS.search(line):
                assert main(uptrain_argv(argv_of(line))) == 0, line
    finally:
        torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert "query heads (H) 8 KV heads 8" in out  # inspect
    assert json.loads((tmp_path / "smollm2-mqa" / "config.json").read_text())["num_key_value_heads"] == 1
    conv = json.loads((tmp_path / "smollm2-mqa" / "uptrain.json").read_text())["conversion"]
    assert conv["method"] == "aligned" and conv["calibration"]["default"] and "refine" in conv
    assert "| smollm2-135m-mha " in out and "| smollm2-mqa " in out  # eval's table, both rows


def test_the_readme_python_example_runs(tmp_path, monkeypatch, tokenizer, capsys):
    """README's six lines, as written, on a tiny MHA Llama standing where `uptrain demo` leaves its own."""
    import torch
    from tiny_models import save, tiny_model

    block = next(body for lang, body in code_blocks(read("README.md")) if lang == "python")
    assert len(block.splitlines()) == 6
    save(tiny_model("llama"), tmp_path / "demo-out" / "runs" / "mha-pretrain", tokenizer=tokenizer)
    os.symlink(os.path.join(REPO, "recipes"), tmp_path / "recipes")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPTRAIN_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        torch.set_num_threads(threads)
    out = " ".join(capsys.readouterr().out.split())
    assert "query heads (H) 8 KV heads 8" in out  # inspect
    assert json.loads((tmp_path / "gqa2" / "config.json").read_text())["num_key_value_heads"] == 2  # convert
    record = json.loads((tmp_path / "runs" / "tiny-cpu" / "uptrain.json").read_text())  # train
    assert record["uptraining"]["steps"] == 24 and record["conversion"]["kv_heads_after"] == 2
    assert "| gqa2 " in out and "| tiny-cpu " in out  # evaluate's table
    assert "dry run: nothing uploaded" in out and "you/demo-gqa2" in out  # push

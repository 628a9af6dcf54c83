"""`uptrain demo --quick` end to end through the real CLI: report, JSON, plots, and numbers that agree."""
import json
import os
import re
import subprocess
import sys

import pytest

# One torch thread: the miniature's matrices are too small to split, and two OpenMP threads on a busy 2-core
# machine cost ~4× the CPU time (measured: 148 s of CPU against 32 s for the whole --quick run).
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    r = subprocess.run([sys.executable, "-m", "uptrain", "demo", "--quick", "--out", str(out), "--no-progress",
                        "--threads", "1"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_report_json_and_plots_exist(demo_run):
    out, r = demo_run
    assert "[demo] done in" in r.stdout
    for f in ("report.md", "results.json", "quality_vs_cost.png", "method_ablation.png", "alpha_sweep.png",
              "training_curves.png"):
        assert (out / f).is_file(), f
    for png in out.glob("*.png"):
        assert png.stat().st_size > 10_000, png  # a real figure, not an empty canvas
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the time it took, wall and CPU, in the report, the JSON and the last line
    results = json.loads((out / "results.json").read_text())
    assert results["threads"] == 1 and 0 < results["cpu_time_s"] and 0 < results["wall_time_s"]
    report = (out / "report.md").read_text()
    assert f"Wall time {results['wall_time_s'] / 60:.1f} min, CPU time {results['cpu_time_s'] / 60:.1f} min on 1 " \
           f"torch thread." in report
    assert "min of CPU time on 1 torch thread)" in r.stdout
    # where it ran, which the README's generated demo figures quote (uptrain.miniature.report.published)
    import os

    import torch

    from uptrain.miniature.report import published

    assert results["machine"]["cores"] == os.cpu_count() and results["machine"]["torch"] == torch.__version__
    readme = published(results, "readme")
    assert "| MHA " in readme and "| MQA aligned " in readme and "| MQA first " not in readme
    assert f"{results['cpu_time_s'] / 60:.1f} min of CPU on 1 torch thread" in readme
    assert all(f in published(results, "demo") for f in results["findings"])


def test_json_has_every_row_the_report_shows(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    rows = {r["model"]: r for r in results["rows"]}
    report = (out / "report.md").read_text()
    table_models = set()
    for line in report.splitlines():
        m = re.match(r"^\| ([^|]+?)\s+\| ", line)
        if m and m.group(1) not in ("model",) and not m.group(1).startswith(":"):
            table_models.add(m.group(1))
    assert table_models and table_models <= rows.keys(), table_models - rows.keys()
    for name in table_models:  # the numbers in the table are the JSON's numbers (to the digits shown)
        row = rows[name]
        line = next(l for l in report.splitlines() if l.startswith(f"| {name} "))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[-2]) == pytest.approx(row["ppl_step0"], rel=2e-3)
        assert float(cells[-1]) == pytest.approx(row["ppl_uptrained"], rel=2e-3)
    assert len(results["findings"]) >= 3 and all(f in report for f in results["findings"])


def test_mha_step0_equals_pretraining_eval(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    mha = next(r for r in results["rows"] if r["model"] == "MHA")
    pre = results["pretrain"]["final_eval"]
    assert mha["ppl_step0"] == pytest.approx(pre["perplexity"], rel=1e-5)


def test_converted_models_have_the_kv_heads_they_claim(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        for key in ("step0_path", "uptrained_path"):
            assert not os.path.isabs(row[key])  # relative to the run's folder: it may be moved or published
            cfg = json.loads(open(os.path.join(out, row[key], "config.json")).read())
            assert cfg["num_key_value_heads"] == row["kv_heads"], (row["model"], key)
        expected = {"MHA": 8, "MQA": 1}.get(row["model"].split()[0]) or int(row["model"].split()[0].split("-")[1])
        assert row["kv_heads"] == expected
    kv = {r["model"]: r["kv_cache_bytes_per_token"] for r in results["rows"]}
    assert kv["MHA"] == 8 * kv["MQA"] == 4 * kv["GQA-2"] == 2 * kv["GQA-4"]


@pytest.mark.usefixtures("one_thread")
def test_rerun_needs_overwrite_and_resume_reuses_stages(demo_run, capfd):
    """The CLI's main() in-process (the fixture ran the real entry point; two more interpreters cost ~10 s)."""
    from uptrain.cli import main

    out, _ = demo_run
    args = ["demo", "--quick", "--out", str(out), "--no-progress"]
    capfd.readouterr()
    assert main(args) == 2
    err = capfd.readouterr().err
    assert "--resume" in err and "--overwrite" in err
    before = (out / "results.json").read_text()
    assert main(args + ["--resume"]) == 0
    assert "uptrain train:" not in capfd.readouterr().out  # nothing was trained again
    after = json.loads((out / "results.json").read_text())
    assert [x["ppl_uptrained"] for x in after["rows"]] == [x["ppl_uptrained"] for x in json.loads(before)["rows"]]


def test_llama_record_names_the_objective(demo_run):
    from uptrain.record import read_record

    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["arch"] == "llama"
    mqa = next(r for r in results["rows"] if r["model"] == "MQA")
    assert read_record(out / mqa["uptrained_path"]).uptraining.objective == "causal-lm"
    assert str(out) not in (out / "results.json").read_text()  # no path in it depends on where the run was


def test_results_name_paths_relative_to_the_run_folder(tmp_path, monkeypatch):
    """results.json's paths, whether the run folder was given absolute or relative to the working directory (the
    default `--out demo-out`), are relative to the run folder; other strings and paths elsewhere stay as they are."""
    from uptrain.miniature.report import within

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo-out" / "runs" / "mha").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    given = {"rows": [{"step0_path": "demo-out/runs/mha", "uptrained_path": str(tmp_path / "demo-out" / "runs" / "mha"),
                       "model": "MHA", "gone": str(tmp_path / "demo-out" / "runs" / "removed")}],
             "other": str(tmp_path / "elsewhere"), "name": "runs"}
    for root in ("demo-out", str(tmp_path / "demo-out")):
        assert within(given, root) == {"rows": [{"step0_path": "runs/mha", "uptrained_path": "runs/mha",
                                                 "model": "MHA", "gone": "runs/removed"}],
                                       "other": str(tmp_path / "elsewhere"), "name": "runs"}


def test_unknown_arch_or_no_thread_is_refused_before_anything_runs(tmp_path, capfd):
    from uptrain.cli import main
    from uptrain.errors import UptrainError
    from uptrain.miniature import demo

    with pytest.raises(UptrainError, match="llama, t5"):
        demo(out=str(tmp_path / "out"), arch="gpt2", progress=False)
    assert main(["demo", "--out", str(tmp_path / "out"), "--threads", "0"]) == 2
    assert "--threads 0" in capfd.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_help_states_the_measured_time(capsys):
    from uptrain.cli import main
    from uptrain.miniature.sizes import SECONDS, took

    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(took(arch, quick) in out for arch, quick in SECONDS)
    assert took("llama") == f"about {round(SECONDS['llama', False] / 60)} minutes on one CPU core"


def test_beyond_the_paper_finding_says_what_its_ratio_means():
    """Labelled perplexities: source 100, mean-pool 300, aligned 105 → log gaps 1.10 and 0.05 (0.04×)."""
    from uptrain.miniature.findings import _beyond

    rows = [{"model": "MHA", "ppl_step0": 100.0, "ppl_uptrained": 101.0},
            {"model": "MQA", "ppl_step0": 300.0, "ppl_uptrained": 130.0},
            {"model": "MQA mean-norm", "ppl_step0": 200.0, "ppl_uptrained": 120.0},
            {"model": "MQA aligned", "ppl_step0": 105.0, "ppl_uptrained": 102.0}]
    text = _beyond(rows, {x["model"]: x for x in rows}, "MQA")
    assert "perplexity 300.0 (mean), 200.0 (mean-norm), 105.0 (aligned) against the source's 100.0" in text
    assert "aligned starts 5.0% above the source where mean-pooling starts 200% above it" in text
    assert "it loses 0.044× the log-perplexity mean-pooling loses (0.049 against 1.099 nats per token)" in text
    assert "After uptraining 102.0 (aligned) vs 130.0 (mean)." in text and "target" not in text


# ---------------------------------------------------------------- --arch t5
@pytest.fixture(scope="module")
def t5_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo-t5") / "out"
    r = subprocess.run([sys.executable, "-m", "uptrain", "demo", "--arch", "t5", "--quick", "--out", str(out),
                        "--no-progress"], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, json.loads((out / "results.json").read_text()), (out / "report.md").read_text()


def _finding(results, start):
    return next(f for f in results["findings"] if f.startswith(start))


@pytest.mark.slow
def test_t5_demo_writes_the_paper_rows_and_plots(t5_run):
    out, results, report = t5_run
    assert results["settings"]["arch"] == "t5" and results["settings"]["eval"]["objective"] == "span corruption"
    assert [r["model"] for r in results["rows"]] == ["MHA", "GQA-4", "GQA-2", "MQA", "MQA first", "MQA random",
                                                    "GQA-2 mean-norm", "GQA-2 aligned", "MQA mean-norm", "MQA aligned"]
    for f in ("quality_vs_cost.png", "method_ablation.png", "alpha_sweep.png", "training_curves.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "T5.1.1" in report and "Beyond the paper" in report
    # aligned calibrated on span-corrupted text (seq2seq_aligned.py) and starts closer to the source than mean
    r = {x["model"]: x for x in results["rows"]}
    for g in ("GQA-2", "MQA"):
        assert r[f"{g} aligned"]["ppl_step0"] < r[g]["ppl_step0"]
    assert all(f in report for f in results["findings"])
    # the MHA step-0 row is pre-training's own held-out eval: the same corrupted blocks, scored twice
    mha = results["rows"][0]
    assert mha["ppl_step0"] == pytest.approx(results["pretrain"]["final_eval"]["perplexity"], rel=1e-5)


@pytest.mark.slow
def test_t5_checkpoints_cache_and_record(t5_run):
    from uptrain.record import read_record

    out, results, _ = t5_run
    kv = {r["model"]: r["kv_cache_bytes_per_token"] for r in results["rows"]}
    assert kv["MHA"] == 8 * kv["MQA"] == 4 * kv["GQA-2"] == 2 * kv["GQA-4"]
    for row in results["rows"]:
        # cross-attention is pooled with self-attention: the same bytes per source token as per target token
        assert row["cross_kv_cache_bytes_per_source_token"] == row["kv_cache_bytes_per_token"]
        cfg = json.loads(open(os.path.join(out, row["uptrained_path"], "config.json")).read())
        assert cfg.get("num_key_value_heads", cfg["num_heads"]) == row["kv_heads"]
        assert read_record(out / row["uptrained_path"]).uptraining.objective == "span-corruption"


@pytest.mark.slow
def test_t5_findings_agree_with_the_numbers(t5_run):
    _, results, _ = t5_run
    r = {x["model"]: x for x in results["rows"]}
    order = r["MQA"]["ppl_uptrained"] < r["MQA first"]["ppl_uptrained"] < r["MQA random"]["ppl_uptrained"]
    assert ("the paper's order holds." in _finding(results, "Conversion method")) == order
    closer = all(r[g]["ppl_uptrained"] <= r["MQA"]["ppl_uptrained"] for g in ("GQA-4", "GQA-2"))
    assert ("as in the paper" in _finding(results, "Quality vs MHA")) == closer
    at = {round(p["alpha"], 3): p["perplexity"] for p in results["alpha_sweep"]}
    share = (at[0.0] - at[0.05]) / (at[0.0] - at[0.1])
    assert f"gives {share:.0%} of the gain" in _finding(results, "Uptraining proportion")
    # the sweep's α=0.05 point is the same state as the α=0.05 uptraining run
    assert at[0.05] == pytest.approx(r["MQA"]["ppl_uptrained"], rel=1e-4)
    s = results["settings"]
    src, tgt = s["size"]["seq_len"], results["pretrain"]["final_eval"]["tokens"] // s["eval"]["eval_blocks"]
    mha = r["MHA"]["kv_cache_bytes_per_token"]
    cross = _finding(results, "Cross-attention cache")
    assert f"{src}-token source and {tgt}-token target" in cross
    assert f"caches {mha * (src + tgt):,} bytes (MHA)" in cross
    assert f"cross-attention is {src / (src + tgt):.0%} of it" in cross


@pytest.mark.parametrize("mqa_speed, says", [(100.0, "does not show here"), (124.0, "does not show here"),
                                             (126.0, "faster, as the paper measures")])
def test_inference_cost_finding_follows_the_measured_speed(mqa_speed, says):
    from uptrain.miniature.findings import _inference_cost

    rows = [{"kv_cache_bytes_per_token": 8192, "decode_tokens_per_s": 100.0},
            {"kv_cache_bytes_per_token": 1024, "decode_tokens_per_s": mqa_speed}]
    text = _inference_cost(rows)
    assert "shrinks 8×" in text and f"{mqa_speed / 100:.2f}× as fast" in text and says in text


def test_demo_options_speak_the_callers_words(tmp_path, capfd):
    """One DemoOptions for the CLI and the API: the same mistake is a flag on the command line and a keyword in
    Python, and nothing is written."""
    from uptrain.cli import main
    from uptrain.errors import UptrainError
    from uptrain.miniature import demo

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("not a demo")
    with pytest.raises(UptrainError, match=r"out='.*busy' is not empty and is not a demo folder; refusing"):
        demo(out=str(tmp_path / "busy"), progress=False)
    with pytest.raises(UptrainError, match="unknown demo option thread; did you mean threads"):
        demo(out=str(tmp_path / "x"), thread=2)
    with pytest.raises(UptrainError, match="alpha=0: a fraction"):
        demo(out=str(tmp_path / "x"), alpha=0)
    assert main(["demo", "--out", str(tmp_path / "busy"), "--overwrite"]) == 2
    assert f"--out {tmp_path / 'busy'} is not empty and is not a demo folder" in capfd.readouterr().err
    assert (tmp_path / "busy" / "mine.txt").is_file() and not (tmp_path / "x").exists()

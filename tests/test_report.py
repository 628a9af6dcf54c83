"""uptrain.report: number formats, markdown tables; uptrain.evaluation.table: the eval table; uptrain.plots: PNG
plots; uptrain.files: atomic writes."""
import json
import os

import pytest

from uptrain import files, plots, report
from uptrain.evaluation.table import eval_markdown
from uptrain.errors import UptrainError

ROWS = [
    {"label": "mha", "num_attention_heads": 8, "num_key_value_heads": 8, "params": 1_234_567, "perplexity": 80.0,
     "loss": 4.382, "ppl_ratio": 1.0, "kv_cache_bytes_per_token": 16384, "kv_cache_bytes_at_context": 16384 * 256,
     "kv_ratio": 1.0, "prefill_tokens_per_s": 5000.0, "decode_tokens_per_s": 40.0, "decode_ms_per_token": 25.0,
     "decode_speedup": 1.0, "peak_memory_bytes": 3 * 2**20, "conversion": None, "uptraining": None,
     "tasks": {"hellaswag": {"metric": "acc_norm", "value": 0.3125}}},
    {"label": "gqa2", "num_attention_heads": 8, "num_key_value_heads": 2, "params": 1_100_000, "perplexity": 84.0,
     "loss": 4.431, "ppl_ratio": 1.05, "kv_cache_bytes_per_token": 4096, "kv_cache_bytes_at_context": 4096 * 256,
     "kv_ratio": 0.25, "prefill_tokens_per_s": 5200.0, "decode_tokens_per_s": 52.0, "decode_ms_per_token": 19.2,
     "decode_speedup": 1.3, "peak_memory_bytes": None,
     "conversion": {"method": "mean", "grouping": "contiguous", "groups": 2}, "uptraining": {"steps": 30},
     "tasks": {"hellaswag": {"error": "offline"}}},
]


def png_pixels(path):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path)


def test_formats():
    assert report.fmt_bytes(0) == "0 B"
    assert report.fmt_bytes(1536) == "1.5 KiB"
    assert report.fmt_bytes(2 * 2**30) == "2 GiB"
    assert report.fmt_bytes(None) == "—"
    assert report.fmt_count(1_234_567) == "1.23M" and report.fmt_count(7e9) == "7B" and report.fmt_count(512) == "512"
    assert report.fmt_num(80.123456) == "80.12" and report.fmt_num(3) == "3" and report.fmt_num(float("nan")) == "—"
    assert report.fmt_ratio(0.25) == "0.25×"


def test_markdown_table_exact():
    cols = [report.col("name", "name", str, "left"), report.col("x", "x value")]
    text = report.markdown_table([{"name": "a", "x": 1.5}, {"name": "bbb", "x": None}], cols)
    assert text == ("| name | x value |\n"
                    "|:-----|--------:|\n"
                    "| a    |     1.5 |\n"
                    "| bbb  |       — |")


def test_eval_markdown_has_conversion_ratios_and_tasks():
    lines = eval_markdown(ROWS).splitlines()
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    gqa = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert gqa["model"] == "gqa2" and gqa["H/KV"] == "8/2" and gqa["conversion"] == "mean +30 steps"
    assert gqa["KV/token"] == "4 KiB" and gqa["KV ×"] == "0.25×" and gqa["KV @ ctx"] == "1 MiB"
    assert gqa["speed-up"] == "1.3×" and gqa["params"] == "1.1M" and gqa["peak mem"] == "—"
    assert gqa["hellaswag acc_norm"] == "failed"
    assert "bits/byte" not in header  # only when some row has it


def test_quality_vs_cost_plot(tmp_path):
    path = plots.plot_quality_vs_cost(ROWS + [{"label": "no-speed", "perplexity": 90.0,
                                               "kv_cache_bytes_per_token": 2048}], tmp_path / "q.png")
    px = png_pixels(path)
    assert px.shape[1] > 2 * px.shape[0] > 600  # two panels side by side
    assert px[..., :3].std() > 0.05  # not a blank canvas
    assert os.listdir(tmp_path) == ["q.png"]


def test_line_and_bar_plots(tmp_path):
    lines = plots.plot_lines({"GQA-2": ([0, 10, 20], [5.0, 4.5, 4.2]), "MQA": ([0, 10, 20], [5.5, 4.8, 4.4])},
                             tmp_path / "l.png", "step", "held-out loss", title="uptraining", logy=True)
    bars = plots.plot_bars(["mean", "first", "random"], {"step 0": [90, 120, 150], "uptrained": [82, 85, 88]},
                           tmp_path / "b.png", "perplexity", errors={"uptrained": [1, 2, 3]}, baseline=80)
    for p in (lines, bars):
        assert png_pixels(p)[..., :3].std() > 0.05


def test_writes_are_atomic(tmp_path):
    target = tmp_path / "r.json"
    files.write_json(target, [{"a": 1}])

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        files.atomic_write(target, fail)
    assert json.loads(target.read_text()) == [{"a": 1}]  # the old file is intact
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary left behind


def test_check_file_writable(tmp_path):
    files.check_file_writable(tmp_path / "ok.json")
    with pytest.raises(UptrainError, match="does not exist"):
        files.check_file_writable(tmp_path / "missing" / "x.png")
    with pytest.raises(UptrainError, match="is a folder"):
        files.check_file_writable(tmp_path)

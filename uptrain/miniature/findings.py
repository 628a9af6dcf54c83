"""The demo's numbers as the paper's tables: one row per variant, the α-sweep points, and plain-language
findings that each say whether the paper's claim held here."""
from __future__ import annotations

import math

from uptrain.miniature.sizes import ALPHAS


def table_rows(vs, eval_rows, uptrained, steps, alpha) -> list[dict]:
    """One row per variant from the evaluation's "NAME (step 0)" / "NAME (uptrained)" rows."""
    by_label = {r["label"]: r for r in eval_rows}
    rows = []
    for v in vs:
        s0, up = by_label[f"{v.name} (step 0)"], by_label[f"{v.name} (uptrained)"]
        rows.append({
            "model": v.name, "role": v.role, "method": v.method or "—", "kv_heads": s0["num_key_value_heads"],
            "kv_cache_bytes_per_token": s0["kv_cache_bytes_per_token"],
            "decode_ms_per_token": s0.get("decode_ms_per_token"), "decode_tokens_per_s": s0["decode_tokens_per_s"],
            "ppl_step0": s0["perplexity"], "ppl_uptrained": up["perplexity"],
            "uptrain_steps": steps, "alpha": alpha, "step0_path": s0["path"], "uptrained_path": up["path"],
        })
        if "cross_kv_cache_bytes_per_source_token" in s0:  # an encoder-decoder's decoder also caches the source
            rows[-1]["cross_kv_cache_bytes_per_source_token"] = s0["cross_kv_cache_bytes_per_source_token"]
    return rows


def sweep_points(sweep, n) -> list[dict]:
    return [{"alpha": h["step"] / n, "step": h["step"], "perplexity": h["perplexity"]} for h in sweep["eval_history"]]


def mha_step0(rows: list[dict]) -> float:
    return next(x["ppl_step0"] for x in rows if x["model"] == "MHA")


def findings(rows: list[dict], sweep: dict, n: int, lengths: tuple[int, int] | None = None) -> list[str]:
    """Plain-language findings computed from the numbers: each says whether the paper's claim held here.
    lengths: an encoder-decoder's (source, target) tokens, for the cross-attention share of its KV cache."""
    r = {x["model"]: x for x in rows}
    out = [_method_order(r), _gqa_vs_mqa(rows, r)]
    share = _sweep_share(sweep_points(sweep, n))
    if share:
        out.append(share)
    out.append(_inference_cost(rows))
    if lengths and all("cross_kv_cache_bytes_per_source_token" in x for x in rows):
        out.append(_cross_share(rows, *lengths))
    for g in ("GQA-2", "MQA"):
        if f"{g} aligned" in r and f"{g} mean-norm" in r:
            out.append(_beyond(rows, r, g))
    return out


def _method_order(r) -> str:
    m, f, rnd = (r[k] for k in ("MQA", "MQA first", "MQA random"))
    order0 = m["ppl_step0"] < f["ppl_step0"] < rnd["ppl_step0"]
    order1 = m["ppl_uptrained"] < f["ppl_uptrained"] < rnd["ppl_uptrained"]
    return (f"Conversion method (paper Fig. 4: mean > first > random): after uptraining MQA reaches perplexity "
            f"{m['ppl_uptrained']:.1f} (mean) / {f['ppl_uptrained']:.1f} (first) / {rnd['ppl_uptrained']:.1f} "
            f"(random) — " + ("the paper's order holds." if order1 else "the paper's order does NOT hold here.")
            + f" At step 0: {m['ppl_step0']:.1f} / {f['ppl_step0']:.1f} / {rnd['ppl_step0']:.1f}"
            + (" (same order)." if order0 else " (a different order)."))


def _gqa_vs_mqa(rows, r) -> str:
    mha, m = r["MHA"]["ppl_uptrained"], r["MQA"]
    gqa = [x for x in rows if x["role"] == "main" and x["model"].startswith("GQA")]
    parts = [f"{x['model']} {x['ppl_uptrained'] / mha - 1:+.1%}" for x in gqa]
    closer = all(x["ppl_uptrained"] <= m["ppl_uptrained"] for x in gqa)
    return (f"Quality vs MHA after the same {m['uptrain_steps']} steps (MHA {mha:.1f}): " + ", ".join(parts)
            + f", MQA {m['ppl_uptrained'] / mha - 1:+.1%} — "
            + ("GQA stays closer to MHA than MQA, as in the paper." if closer else
               "here GQA is not closer to MHA than MQA, unlike the paper."))


def _sweep_share(pts) -> str | None:
    if len(pts) < 3:
        return None
    p0 = pts[0]["perplexity"]
    at = {round(p["alpha"], 3): p["perplexity"] for p in pts}
    p05, p10 = at.get(0.05), at.get(round(max(ALPHAS), 3))
    if p05 is None or p10 is None or p0 == p10:
        return None
    share = (p0 - p05) / (p0 - p10)
    return (f"Uptraining proportion (paper Fig. 5): MQA goes {p0:.1f} → {p05:.1f} at α=0.05 → {p10:.1f} "
            f"at α=0.1, so α=0.05 already gives {share:.0%} of the gain α=0.1 gives"
            + (" — most of it, as in the paper." if share >= 0.5 else " — less than half, unlike the paper."))


FASTER = 1.25  # a decode-speed ratio the report calls faster (tiny models on a CPU: ±20% between identical runs)


def _inference_cost(rows) -> str:
    big = max(rows, key=lambda x: x["kv_cache_bytes_per_token"])
    small = min(rows, key=lambda x: x["kv_cache_bytes_per_token"])
    sp = (small["decode_tokens_per_s"] or 0) / (big["decode_tokens_per_s"] or 1)
    head = (f"Inference cost: the KV cache shrinks "
            f"{big['kv_cache_bytes_per_token'] / small['kv_cache_bytes_per_token']:.0f}× "
            f"from MHA to MQA; cached decode is {sp:.2f}× as fast on this CPU")
    if sp >= FASTER:
        return (head + " — faster, as the paper measures on large models, though a model this small is bound by "
                "weights and Python overhead more than by cache traffic, and timings on a shared CPU vary a lot "
                "between runs: the bytes, not this ratio, are the result to trust here.")
    return (head + " — a model this small is bound by weights and Python overhead, not by cache traffic, so the "
            "speed-up the paper measures on large models at long context does not show here.")


def _beyond(rows, r, g) -> str:
    src = mha_step0(rows)
    ppl = {meth: r[k]["ppl_step0"] for meth, k in (("mean", g), ("mean-norm", f"{g} mean-norm"),
                                                    ("aligned", f"{g} aligned"))}
    gap = {meth: math.log(p) - math.log(src) for meth, p in ppl.items()}
    ratio = gap["aligned"] / gap["mean"] if gap["mean"] > 0 else float("nan")
    return (f"Beyond the paper, {g} at step 0: perplexity {ppl['mean']:.1f} (mean), {ppl['mean-norm']:.1f} "
            f"(mean-norm), {ppl['aligned']:.1f} (aligned) against the source's {src:.1f}. aligned starts "
            f"{_off(ppl['aligned'], src)} the source where mean-pooling starts {_off(ppl['mean'], src)} it: "
            f"it loses {ratio:.2g}× the log-perplexity mean-pooling loses ({gap['aligned']:.3f} against "
            f"{gap['mean']:.3f} nats per token). After uptraining {r[f'{g} aligned']['ppl_uptrained']:.1f} (aligned) "
            f"vs {r[g]['ppl_uptrained']:.1f} (mean).")


def _off(value: float, ref: float) -> str:
    """"336% above" / "0.5% below": where `value` is relative to `ref`."""
    off = abs(value / ref - 1)
    return (f"{off:.1%}" if off < 0.1 else f"{off:.0%}") + (" above" if value >= ref else " below")


def cross_share(row: dict, source: int, target: int) -> float:
    """The cross-attention part of a decoder's KV cache after reading `source` tokens and writing `target`."""
    cross = row["cross_kv_cache_bytes_per_source_token"] * source
    return cross / (cross + row["kv_cache_bytes_per_token"] * target)


def _cross_share(rows, source: int, target: int) -> str:
    r = {x["model"]: x for x in rows}
    mha, mqa = r["MHA"], r["MQA"]

    def total(cross_row, self_row):
        return (cross_row["cross_kv_cache_bytes_per_source_token"] * source
                + self_row["kv_cache_bytes_per_token"] * target)

    t_mha, t_mqa, t_self_only = total(mha, mha), total(mqa, mqa), total(mha, mqa)
    s_mha, s_mqa = cross_share(mha, source, target), cross_share(mqa, source, target)
    return (f"Cross-attention cache (the paper converts the decoder's self- and cross-attention): for a "
            f"{source}-token source and {target}-token target the decoder caches {t_mha:,} bytes (MHA) vs "
            f"{t_mqa:,} (MQA), {t_mha / t_mqa:.1f}× less; cross-attention is {s_mha:.0%} of it (MHA) and "
            f"{s_mqa:.0%} (MQA). Converting self-attention alone would leave {t_self_only:,} bytes, only "
            f"{t_mha / t_self_only:.1f}× less"
            + (" — most of the saving is in cross-attention at this length." if s_mha > 0.5 else
               " — at this length most of the saving is in self-attention."))

"""Where each model forms its attention sink on held-out text: per block, the first layer whose output at the
block's first position is massive, and the block's loss, for a source and its converted or uptrained folders.

    python tests/benchmarks/bench_sink.py SRC OUT [OUT …] [--kinds plays c …] [--tokens 4096] [--seq-len 1024]
           [--ratio 20] [--threads N]

Pre-trained decoders give the first position of a sequence a hidden state a hundred times larger than the others'
(SmolLM2-135M: ~24,000 against a median ~200, from layer 11's output on), the mark of an attention sink. A
converted model whose attention at the first position drifts can fail to form it on some text, and then loses nats
on every token of that block, not a few. This prints, per held-out block (the kinds of uptrain/evaluation/kinds.py,
the source's tokenizer), the layer where each model's first-position norm first exceeds `--ratio` × that layer's
median norm ("—": never) and the block's mean loss (nats per token), then the blocks where a model's sink is
missing or forms at another layer than the source's.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_kinds import kind_parser, kind_setup  # noqa: E402


@torch.no_grad()
def sink_and_loss(model, block: torch.Tensor, ratio: float) -> tuple[int | None, float]:
    """(the first layer whose output at position 0 has ratio × the median norm of its positions, or None; the
    block's mean next-token loss)."""
    out = model(block[None], output_hidden_states=True)
    layer = None
    for i, h in enumerate(out.hidden_states[1:]):
        norms = h[0].norm(dim=-1)
        if norms[0] > ratio * norms.median():
            layer = i
            break
    loss = torch.nn.functional.cross_entropy(out.logits[0, :-1].float(), block[1:])
    return layer, float(loss)


def main() -> None:
    from uptrain import hf

    p = kind_parser(__doc__, tokens=4096)
    p.add_argument("--ratio", type=float, default=20.0, help="a sink: this many times the layer's median norm")
    a = p.parse_args()
    tok, blocks = kind_setup(a)
    paths = [a.src] + a.outs
    labels = [os.path.basename(os.path.normpath(x)) for x in paths]
    rows: dict[tuple[str, int], list[tuple[int | None, float]]] = {}
    for path in paths:
        model = hf.load_model(hf.resolve(path), dtype=torch.float32, quiet=True)
        for kind, bb in blocks.items():
            for j in range(bb.shape[0]):
                rows.setdefault((kind, j), []).append(sink_and_loss(model, bb[j], a.ratio))
        del model

    def cell(r: tuple[int | None, float]) -> str:
        return f"{'—' if r[0] is None else r[0]} | {r[1]:.2f}"

    print("| kind | block | starts | " + " | ".join(f"{x} sink | {x} loss" for x in labels) + " |")
    print("|---|---|---|" + "---|---|" * len(labels))
    for (kind, j), r in rows.items():
        start = tok.decode(blocks[kind][j, :4]).replace("\n", "\\n").replace("|", "\\|")
        print(f"| {kind} | {j} | `{start}` | " + " | ".join(cell(x) for x in r) + " |")
    print()
    for i, label in enumerate(labels[1:], 1):
        off = [(k, j, r[i]) for (k, j), r in rows.items() if r[i][0] != r[0][0]]
        if not off:
            print(f"{label}: the sink forms where the source's does on all {len(rows)} blocks")
        for k, j, r in off:
            where = "never forms" if r[0] is None else f"forms at layer {r[0]}"
            print(f"{label}: {k} block {j}: the sink {where} (source: layer {rows[(k, j)][0][0]}); loss "
                  f"{r[1]:.2f} against the source's {rows[(k, j)][0][1]:.2f}")


if __name__ == "__main__":
    main()

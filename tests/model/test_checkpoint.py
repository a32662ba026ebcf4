"""save/load round trip and clear failures on bad checkpoints."""

import json
import pickle

import pytest
import torch
from conftest import batch

from racedit.model import CheckpointError, build, load, save


def trained_tiny():
    model = build("tiny").train()
    model(*batch(model, 4))
    return model.eval()


def test_round_trip_is_bit_exact(tmp_path):
    model = trained_tiny()
    save(model, tmp_path / "ck", metadata={"steps": 1})
    loaded = load(tmp_path / "ck")
    for (k1, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k1 == k2 and torch.equal(a, b)
    x, t, y = batch(model, 3)
    assert torch.equal(model(x, t, y).prediction, loaded(x, t, y).prediction)
    doc = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert doc["metadata"] == {"steps": 1} and doc["class_names"][6] == "star"
    assert doc["thresholds"] == [float(layer.threshold) for layer in model.moe_layers]
    assert loaded.config == model.config


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load(tmp_path / "nope")


def test_missing_weights_file(tmp_path):
    save(trained_tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load(tmp_path)


def test_truncated_weights(tmp_path):
    save(trained_tiny(), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: unreadable or truncated"):
        load(tmp_path)


def test_mismatched_config(tmp_path):
    save(trained_tiny(), tmp_path)
    doc = json.loads((tmp_path / "config.json").read_text())
    doc["model"]["hidden_size"] = 32
    (tmp_path / "config.json").write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="does not match config.json.*shape mismatches"):
        load(tmp_path)


def test_pickle_is_refused_with_conversion_hint(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(build("tiny").state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle checkpoints are refused(.|\n)*save\\(m"):
        load(path)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "weights.pkl").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError, match="weights.pkl: pickle"):
        load(raw)


def test_corrupt_config(tmp_path):
    save(trained_tiny(), tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load(tmp_path)


def test_half_precision_weights_keep_thresholds_exact(tmp_path):
    model = trained_tiny()
    save(model, tmp_path / "half", weights_dtype=torch.float16)
    full = save(model, tmp_path / "full")
    assert (tmp_path / "half" / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    loaded = load(tmp_path / "half")
    assert next(loaded.parameters()).dtype == torch.float32
    assert [float(a.threshold) for a in loaded.moe_layers] == [float(a.threshold) for a in model.moe_layers]
    for (name, a), b in zip(model.named_parameters(), loaded.parameters()):
        assert torch.equal(a.half().float(), b), name
    assert json.loads((tmp_path / "half" / "config.json").read_text())["weights_dtype"] == "float16"

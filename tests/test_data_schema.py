"""Schema load/save and validation messages (file + key + what is allowed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data import Schema, SchemaError, SparseFeature


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "schema.json"
    p.write_text(json.dumps(data))
    return p


def _good() -> dict:
    return {"labels": ["income", "never_married"], "dense": ["age", "wage_per_hour"],
            "sparse": [{"name": "education", "num_embeddings": 17, "embedding_dim": 8, "multi_hot": False},
                       {"name": "uid", "num_embeddings": 100, "embedding_dim": 8}],
            "user_id": "uid", "personal_features": ["uid"]}


def test_round_trip(tmp_path: Path) -> None:
    s = Schema.load(_write(tmp_path, _good()))
    assert s.labels == ["income", "never_married"]
    assert s.sparse[0] == SparseFeature("education", 17, 8, False)
    assert s.sparse[1].multi_hot is False
    assert s.columns() == ["income", "never_married", "age", "wage_per_hour", "education", "uid"]
    (tmp_path / "copy").mkdir()
    out = s.save(tmp_path / "copy")
    assert out == tmp_path / "copy" / "schema.json"
    assert Schema.load(tmp_path / "copy") == s


def test_load_directory(tmp_path: Path) -> None:
    _write(tmp_path, _good())
    assert Schema.load(tmp_path).num_tasks == 2


@pytest.mark.parametrize("mutate, key, fragment", [
    (lambda d: d.update(extra=1), "extra", "unknown key"),
    (lambda d: d.pop("labels"), "labels", "missing required key"),
    (lambda d: d.update(labels=[]), "labels", "at least one"),
    (lambda d: d.update(dense=["age", "age"]), "dense", "duplicate column name 'age'"),
    (lambda d: d.update(dense=["income"]), "dense", "duplicate column name 'income'"),
    (lambda d: d["sparse"][0].update(num_embeddings=0), "sparse[0].num_embeddings", "positive integer"),
    (lambda d: d["sparse"][0].update(embedding_dim=2.5), "sparse[0].embedding_dim", "positive integer"),
    (lambda d: d["sparse"][0].update(num_embeddings=True), "sparse[0].num_embeddings", "positive integer"),
    (lambda d: d["sparse"][0].update(vocab=3), "sparse[0].vocab", "allowed keys"),
    (lambda d: d["sparse"][0].pop("embedding_dim"), "sparse[0].embedding_dim", "missing key"),
    (lambda d: d["sparse"][0].update(multi_hot="yes"), "sparse[0].multi_hot", "true or false"),
    (lambda d: d.update(personal_features=["age"]), "personal_features", "not a sparse feature"),
    (lambda d: d.update(user_id="age"), "user_id", "already a dense column"),
    (lambda d: d.update(sparse={"name": "x"}), "sparse", "list of objects"),
])
def test_schema_errors_name_file_and_key(tmp_path: Path, mutate, key: str, fragment: str) -> None:
    data = _good()
    mutate(data)
    path = _write(tmp_path, data)
    with pytest.raises(SchemaError) as ei:
        Schema.load(path)
    msg = str(ei.value)
    assert str(path) in msg and fragment in msg
    assert ei.value.file == str(path) and ei.value.key == key


def test_unknown_key_lists_allowed(tmp_path: Path) -> None:
    data = _good()
    data["lables"] = data.pop("labels")
    with pytest.raises(SchemaError, match=r"unknown key\(s\) \['lables'\]; allowed keys are \['dense', 'labels'"):
        Schema.load(_write(tmp_path, data))


def test_bad_json_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "schema.json"
    p.write_text("{not json")
    with pytest.raises(SchemaError, match="not valid JSON"):
        Schema.load(p)
    with pytest.raises(SchemaError, match="cannot read schema file"):
        Schema.load(tmp_path / "nope.json")


def test_constructor_validates() -> None:
    with pytest.raises(SchemaError, match="personal_features"):
        Schema(labels=["y"], dense=[], sparse=[SparseFeature("a", 3, 4)], personal_features=["b"])

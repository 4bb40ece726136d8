"""Dataset schema: which Parquet columns are labels, dense and sparse features.

The schema is the contract between the dataset builders (writer, synthetic, convert,
census) and the reader/models: it travels with the data as ``schema.json`` so a
dataset directory is self-describing.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from trainer.data.errors import SchemaError

SCHEMA_FILE = "schema.json"
_TOP_KEYS = {"labels", "dense", "sparse", "user_id", "personal_features"}
_REQUIRED_TOP = {"labels", "dense", "sparse"}
_SPARSE_KEYS = {"name", "num_embeddings", "embedding_dim", "multi_hot"}
_REQUIRED_SPARSE = {"name", "num_embeddings", "embedding_dim"}


@dataclass(frozen=True)
class SparseFeature:
    """One categorical id feature: an int64 column (list<int64> when multi_hot) and its table size."""

    name: str
    num_embeddings: int
    embedding_dim: int
    multi_hot: bool = False


@dataclass(frozen=True)
class Schema:
    """Column roles of a dataset; see the module docstring. Validated on construction."""

    labels: list[str]
    dense: list[str]
    sparse: list[SparseFeature]
    user_id: str | None = None
    personal_features: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        validate(self, source="<Schema object>")

    # ---- derived views -------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return len(self.labels)

    @property
    def sparse_names(self) -> list[str]:
        return [f.name for f in self.sparse]

    def feature(self, name: str) -> SparseFeature:
        """The sparse feature called ``name`` (KeyError if none)."""
        for f in self.sparse:
            if f.name == name:
                return f
        raise KeyError(name)

    def columns(self) -> list[str]:
        """Every column a Parquet file of this dataset must hold, in a fixed order."""
        cols = [*self.labels, *self.dense, *self.sparse_names]
        if self.user_id is not None and self.user_id not in cols:
            cols.append(self.user_id)
        return cols

    # ---- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": list(self.labels),
            "dense": list(self.dense),
            "sparse": [asdict(f) for f in self.sparse],
            "user_id": self.user_id,
            "personal_features": list(self.personal_features),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Schema":
        """Build from parsed JSON, raising ``SchemaError`` naming ``source`` and the key."""
        if not isinstance(data, dict):
            raise SchemaError(f"{source}: top level must be a JSON object, got {type(data).__name__}", file=source)
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise SchemaError(
                f"{source}: unknown key(s) {unknown}; allowed keys are {sorted(_TOP_KEYS)}",
                file=source, key=unknown[0])
        missing = sorted(_REQUIRED_TOP - set(data))
        if missing:
            raise SchemaError(
                f"{source}: missing required key(s) {missing} (required: {sorted(_REQUIRED_TOP)})",
                file=source, key=missing[0])
        for key in ("labels", "dense", "personal_features"):
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise SchemaError(f"{source}: key '{key}' must be a list of non-empty strings, got {value!r}",
                                  file=source, key=key)
        if not isinstance(data["sparse"], list):
            raise SchemaError(f"{source}: key 'sparse' must be a list of objects, got {data['sparse']!r}",
                              file=source, key="sparse")
        sparse = [_sparse_from_dict(item, i, source) for i, item in enumerate(data["sparse"])]
        user_id = data.get("user_id")
        if user_id is not None and (not isinstance(user_id, str) or not user_id):
            raise SchemaError(f"{source}: key 'user_id' must be null or a column name, got {user_id!r}",
                              file=source, key="user_id")
        obj = object.__new__(cls)
        for name, value in (("labels", list(data["labels"])), ("dense", list(data["dense"])), ("sparse", sparse),
                            ("user_id", user_id), ("personal_features", list(data.get("personal_features", [])))):
            object.__setattr__(obj, name, value)
        validate(obj, source=source)
        return obj

    @classmethod
    def load(cls, path: str | Path) -> "Schema":
        """Read ``path`` (a schema.json file, or a dataset directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / SCHEMA_FILE
        try:
            text = p.read_text()
        except OSError as e:
            raise SchemaError(f"{p}: cannot read schema file ({e.strerror or e})", file=str(p)) from e
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})", file=str(p)) from e
        return cls.from_dict(data, source=str(p))

    def save(self, path: str | Path) -> Path:
        """Write as JSON to ``path`` (a file, or a directory that gets ``schema.json``)."""
        p = Path(path)
        if p.is_dir():
            p = p / SCHEMA_FILE
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return p


def _sparse_from_dict(item: Any, index: int, source: str) -> SparseFeature:
    where = f"sparse[{index}]"
    if not isinstance(item, dict):
        raise SchemaError(f"{source}: '{where}' must be an object with keys {sorted(_SPARSE_KEYS)}, got {item!r}",
                          file=source, key=where)
    unknown = sorted(set(item) - _SPARSE_KEYS)
    if unknown:
        raise SchemaError(f"{source}: '{where}' has unknown key(s) {unknown}; allowed keys are {sorted(_SPARSE_KEYS)}",
                          file=source, key=f"{where}.{unknown[0]}")
    missing = sorted(_REQUIRED_SPARSE - set(item))
    if missing:
        raise SchemaError(f"{source}: '{where}' is missing key(s) {missing} (required: {sorted(_REQUIRED_SPARSE)})",
                          file=source, key=f"{where}.{missing[0]}")
    multi_hot = item.get("multi_hot", False)
    if not isinstance(multi_hot, bool):
        raise SchemaError(f"{source}: '{where}.multi_hot' must be true or false, got {multi_hot!r}",
                          file=source, key=f"{where}.multi_hot")
    obj = object.__new__(SparseFeature)
    for name, value in (("name", item["name"]), ("num_embeddings", item["num_embeddings"]),
                        ("embedding_dim", item["embedding_dim"]), ("multi_hot", multi_hot)):
        object.__setattr__(obj, name, value)
    return obj


def _is_pos_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def validate(schema: Schema, source: str) -> None:
    """Check names and sizes; raise ``SchemaError`` naming ``source`` and the key."""
    if not schema.labels:
        raise SchemaError(f"{source}: key 'labels' must name at least one label column", file=source, key="labels")
    for i, f in enumerate(schema.sparse):
        where = f"sparse[{i}]"
        if not isinstance(f.name, str) or not f.name:
            raise SchemaError(f"{source}: '{where}.name' must be a non-empty string, got {f.name!r}",
                              file=source, key=f"{where}.name")
        for attr in ("num_embeddings", "embedding_dim"):
            value = getattr(f, attr)
            if not _is_pos_int(value):
                raise SchemaError(
                    f"{source}: '{where}.{attr}' (feature '{f.name}') must be a positive integer, got {value!r}",
                    file=source, key=f"{where}.{attr}")
    seen: dict[str, str] = {}
    for key, names in (("labels", schema.labels), ("dense", schema.dense), ("sparse", schema.sparse_names)):
        for name in names:
            if name in seen:
                raise SchemaError(
                    f"{source}: duplicate column name '{name}' in '{key}' (already used in '{seen[name]}'); "
                    "every label/dense/sparse name must be unique", file=source, key=key)
            seen[name] = key
    if schema.user_id is not None and seen.get(schema.user_id, "sparse") != "sparse":
        raise SchemaError(
            f"{source}: 'user_id' = '{schema.user_id}' is already a {seen[schema.user_id]} column; it must be a "
            "sparse feature name or a separate int64 column", file=source, key="user_id")
    sparse_names = set(schema.sparse_names)
    for name in schema.personal_features:
        if name not in sparse_names:
            raise SchemaError(
                f"{source}: 'personal_features' entry '{name}' is not a sparse feature; allowed: "
                f"{sorted(sparse_names)}", file=source, key="personal_features")
    if len(set(schema.personal_features)) != len(schema.personal_features):
        raise SchemaError(f"{source}: 'personal_features' has duplicates: {schema.personal_features}",
                          file=source, key="personal_features")

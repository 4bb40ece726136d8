"""Training label rates for balancers that weigh tasks by their priors: read from the label
columns, bad labels left out, the balancer bound by the model builder."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trainer.core.factory import build_balancer
from trainer.config import load_config
from trainer.data.errors import DataError
from trainer.data.label_rates import label_rates
from trainer.data.schema import Schema


def _data_set(tmp_path, columns):
    (tmp_path / "train").mkdir()
    table = pa.table({"a": columns[0], "b": columns[1], "x": [0.5] * len(columns[0])})
    pq.write_table(table.slice(0, 3), tmp_path / "train" / "part-0.parquet")
    pq.write_table(table.slice(3), tmp_path / "train" / "part-1.parquet", row_group_size=2)
    schema = Schema.from_dict({"labels": ["a", "b"], "dense": ["x"], "sparse": []})
    return schema


def test_rates_over_files_and_row_groups(tmp_path):
    schema = _data_set(tmp_path, ([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 1.0, float("nan")]))
    assert label_rates(tmp_path, schema) == pytest.approx((2 / 6, 4 / 5))


def test_a_label_without_valid_values_is_named(tmp_path):
    schema = _data_set(tmp_path, ([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [2.0] * 6))
    with pytest.raises(DataError, match=r"no valid 0/1 label in column\(s\) \['b'\]"):
        label_rates(tmp_path, schema)


def test_builder_binds_prior_entropy_weights(tmp_path):
    schema = _data_set(tmp_path, ([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 1.0, 0.0]))
    cfg = load_config(None, [f"data.path='{tmp_path}'", "balance.method=cograd",
                             "balance.options={weights='prior_entropy'}"])
    bal = build_balancer(cfg, schema)
    import math
    h = lambda p: -(p * math.log(p) + (1 - p) * math.log(1 - p))  # noqa: E731
    assert bal.weights == pytest.approx((1 / h(1 / 3), 1 / h(2 / 3)))

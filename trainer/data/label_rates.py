"""Training label rates: the share of positive labels per task, for balancers that weigh tasks
by their priors (`Balancer.needs_label_rates`). Reads only the label columns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from trainer.data.errors import DataError
from trainer.data.schema import Schema
from trainer.data.row_groups import index_split, open_parquet


def label_rates(root: str | Path, schema: Schema, split: str = "train") -> tuple[float, ...]:
    """Mean of each label column over the rows of ``split`` whose label is 0 or 1 (a bad
    label is left out here; the reader decides what to do with its row)."""
    index = index_split(root, split, schema)
    positives = np.zeros(len(schema.labels))
    counts = np.zeros(len(schema.labels))
    for file in index.metadata:
        pf = open_parquet(file, index.metadata[file])
        for rg in range(pf.metadata.num_row_groups):
            try:
                table = pf.read_row_group(rg, columns=list(schema.labels))
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"{file}: row group {rg}: cannot read the label columns: {e}",
                                file=file, row_group=rg) from e
            for m, name in enumerate(schema.labels):
                values = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
                valid = (values == 0) | (values == 1)
                positives[m] += values[valid].sum()
                counts[m] += valid.sum()
    if not counts.all():
        empty = [name for name, n in zip(schema.labels, counts) if not n]
        raise DataError(f"{Path(root) / split}: no valid 0/1 label in column(s) {empty}", file=str(Path(root) / split))
    return tuple(float(p / n) for p, n in zip(positives, counts))

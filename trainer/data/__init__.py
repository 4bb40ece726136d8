"""Reading data at training time: the data set format (``schema.json`` plus ``train/``,
``valid/``, ``test/`` Parquet splits, see `schema`), validation and decoding of row groups,
which rows each rank reads (`row_groups`), and `ParquetReader` / `TrainStream`, which turn
a split into per-rank ``Batch``es. Building data sets lives in `trainer.datasets`."""

from trainer.data.batch import Batch
from trainer.data.errors import DataError, SchemaError
from trainer.data.reader import ParquetReader
from trainer.data.schema import Schema, SparseFeature
from trainer.data.stream import TrainStream

__all__ = ["Batch", "DataError", "SchemaError", "ParquetReader", "Schema", "SparseFeature", "TrainStream"]

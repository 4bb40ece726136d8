"""recbalance data layer: dataset format, validation, sharded Parquet reading, builders.

A dataset is a directory with ``schema.json`` and ``train/``, ``valid/``, ``test/``
Parquet splits (see ``schema``). ``ParquetReader`` turns a split into per-rank
``Batch``es; ``make_synthetic``, ``make_census`` and ``convert_csv`` build datasets.
"""

from .batch import Batch
from .census import make_census
from .cli import add_data_commands, run_data_command
from .convert import ConvertResult, ConvertSpec, LabelSpec, convert_csv
from .errors import DataError, SchemaError
from .reader import ParquetReader
from .schema import Schema, SparseFeature
from .stream import TrainStream
from .synthetic import SyntheticInfo, make_synthetic
from .writer import SplitWriter, arrow_schema, write_schema, write_split

__all__ = [
    "Batch", "DataError", "SchemaError", "ParquetReader", "Schema", "SparseFeature", "TrainStream",
    "SplitWriter", "arrow_schema", "write_schema", "write_split", "make_synthetic", "SyntheticInfo",
    "make_census", "convert_csv", "ConvertSpec", "ConvertResult", "LabelSpec", "add_data_commands",
    "run_data_command",
]

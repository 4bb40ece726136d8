"""Building data sets in recbalance's format (`trainer.data.schema`): synthetic multi-task data,
UCI census, NYC flights (held out from the balancers' tuning), the user's CSV/TSV files, the writer they share, and the ``recbalance data``
commands."""

from trainer.datasets.census import make_census
from trainer.datasets.flights import make_flights
from trainer.datasets.convert import ConvertResult, ConvertSpec, LabelSpec, convert_csv
from trainer.datasets.synthetic import SyntheticInfo, make_synthetic
from trainer.datasets.writer import SplitWriter, arrow_schema, write_schema, write_split

__all__ = ["SplitWriter", "arrow_schema", "write_schema", "write_split", "make_synthetic", "SyntheticInfo",
           "make_census", "make_flights", "convert_csv", "ConvertSpec", "ConvertResult", "LabelSpec"]

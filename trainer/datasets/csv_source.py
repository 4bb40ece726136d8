"""Stream delimited text files block by block as string columns (pyarrow.csv.open_csv).

Everything is read as strings, trimmed, and null markers turned into nulls, so the
converter controls parsing and can name the file, column and line of any bad value.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from trainer.data.errors import DataError

DEFAULT_NULLS = ("", "NA", "N/A", "NaN", "nan", "null", "NULL", "None", "?")
DEFAULT_BLOCK_BYTES = 16 << 20


@dataclass
class TextFormat:
    """How the files are laid out."""

    delimiter: str = ","
    header: bool = True
    null_values: tuple[str, ...] = DEFAULT_NULLS
    block_bytes: int = DEFAULT_BLOCK_BYTES


@dataclass
class Block:
    """A block of rows: string columns by name, and the 1-based file line of its first row."""

    table: pa.Table
    first_line: int
    file: str


def column_names(file: str | Path, fmt: TextFormat, names: list[str] | None = None) -> list[str]:
    """Column names of ``file``: its header, or ``names`` / c0..cN for headerless files."""
    try:
        reader = pacsv.open_csv(
            str(file), read_options=pacsv.ReadOptions(autogenerate_column_names=not fmt.header,
                                                      block_size=1 << 20),
            parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter),
            convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        found = [n.strip() for n in reader.schema.names]
        reader.close()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: cannot read as delimited text (delimiter {fmt.delimiter!r}): {e}",
                        file=str(file)) from e
    if fmt.header:
        return found
    if names is None:
        return [f"c{i}" for i in range(len(found))]
    if len(names) != len(found):
        raise DataError(f"{file}: has {len(found)} columns but {len(names)} column names were given",
                        file=str(file))
    return list(names)


def iter_blocks(file: str | Path, fmt: TextFormat, names: list[str], include: list[str],
                limit: int | None = None) -> Iterator[Block]:
    """Yield blocks of the ``include`` columns (trimmed strings, null markers -> null)."""
    read = pacsv.ReadOptions(column_names=names, skip_rows=1 if fmt.header else 0, block_size=fmt.block_bytes)
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in include}, include_columns=include,
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    nulls = pa.array(list(fmt.null_values), pa.string())
    line = 2 if fmt.header else 1
    seen = 0
    try:
        reader = pacsv.open_csv(str(file), read_options=read,
                                parse_options=pacsv.ParseOptions(delimiter=fmt.delimiter), convert_options=convert)
        for batch in reader:
            if limit is not None and seen + batch.num_rows > limit:
                batch = batch.slice(0, limit - seen)
            if batch.num_rows == 0:
                if limit is not None and seen >= limit:
                    break
                continue
            cols = []
            for name in include:
                col = pc.utf8_trim_whitespace(batch.column(name))
                cols.append(pc.if_else(pc.is_in(col, value_set=nulls), pa.scalar(None, pa.string()), col))
            yield Block(pa.table(cols, names=include), line, str(file))
            line += batch.num_rows
            seen += batch.num_rows
            if limit is not None and seen >= limit:
                break
        reader.close()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: cannot parse delimited text near line {line} (delimiter {fmt.delimiter!r}): {e}",
                        file=str(file)) from e

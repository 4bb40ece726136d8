"""Exceptions of the data layer.

Every data problem surfaces as a ``DataError`` that names where it is (file, column,
row group) so a user can find the bad bytes without a debugger; schema problems are a
``SchemaError`` naming the schema file and the offending key.
"""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad input data. ``file``, ``column`` and ``row_group`` locate it (None if not applicable)."""

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        row_group: int | None = None,
    ) -> None:
        super().__init__(message)
        self.file = file
        self.column = column
        self.row_group = row_group

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when the error crosses a process/thread boundary by pickling.
        return (_rebuild, (type(self), str(self), self.file, self.column, self.row_group))


def _rebuild(cls: type, message: str, file: str | None, column: str | None, row_group: int | None) -> DataError:
    err = cls.__new__(cls)
    DataError.__init__(err, message, file=file, column=column, row_group=row_group)
    return err


class SchemaError(DataError):
    """A schema.json (or schema object) that is malformed; ``column`` holds the offending key."""

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None) -> None:
        super().__init__(message, file=file, column=key)
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:
        return (SchemaError, (str(self),), {"file": self.file, "key": self.key, "column": self.key, "row_group": None})

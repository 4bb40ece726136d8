"""TrainStream: endless training batches over epochs, resumable at exactly the next batch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from trainer.data.batch import Batch
from trainer.data.reader import ParquetReader


class TrainStream:
    """Infinite iterator over ``reader.epoch(0), reader.epoch(1), ...``.

    ``state_dict()`` is the position of the NEXT batch; saving it with a checkpoint and
    ``load_state_dict`` on restart continues with no batch skipped or repeated.
    """

    def __init__(self, reader: ParquetReader) -> None:
        if reader.batches_per_epoch <= 0:
            raise ValueError(f"split '{reader.split}' yields no batches; cannot stream it")
        self.reader = reader
        self._epoch = 0
        self._batch = 0
        self._it: Iterator[Batch] | None = None

    @property
    def epoch(self) -> int:
        return self._epoch

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> Batch:
        if self._batch >= self.reader.batches_per_epoch:
            self._advance_epoch()
        if self._it is None:
            self._it = self.reader.epoch(self._epoch, start_batch=self._batch)
        try:
            batch = next(self._it)
        except StopIteration:
            self._advance_epoch()
            return next(self)
        self._batch += 1
        return batch

    def _advance_epoch(self) -> None:
        self._close_iter()
        self._epoch += 1
        self._batch = 0

    def state_dict(self) -> dict[str, int]:
        """{"epoch": e, "batch": b}: the next batch to yield is batch b of epoch e."""
        if self._batch >= self.reader.batches_per_epoch:
            return {"epoch": self._epoch + 1, "batch": 0}
        return {"epoch": self._epoch, "batch": self._batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (from ``state_dict``)."""
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"TrainStream state must be {{'epoch': int, 'batch': int}}, got {state!r}") from e
        if epoch < 0 or batch < 0:
            raise ValueError(f"TrainStream state must be non-negative, got {state!r}")
        self._close_iter()
        self._epoch, self._batch = epoch, batch

    def _close_iter(self) -> None:
        if self._it is not None:
            close = getattr(self._it, "close", None)
            if close is not None:
                close()
            self._it = None

    def close(self) -> None:
        """Stop the reader's prefetch thread."""
        self._close_iter()

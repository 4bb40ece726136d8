"""Run a producer iterator in a background thread behind a bounded queue.

Why: decoding Parquet overlaps with the training step. The queue bounds memory to
``depth`` items; a producer exception is re-raised in the consumer unchanged; closing or
dropping the iterator stops the thread (it never blocks forever on a full queue).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _produce(source: Iterator, q: "queue.Queue[object]", stop: threading.Event) -> None:
    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    try:
        for item in source:
            if not put(item):
                return
        put(_DONE)
    except BaseException as e:  # noqa: BLE001 - forwarded to the consumer verbatim
        put(_Failure(e))
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


class PrefetchIterator(Generic[T]):
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead."""

    def __init__(self, source: Iterator[T], depth: int, name: str = "recbalance-data-prefetch") -> None:
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=_produce, args=(source, self._queue, self._stop), name=name,
                                        daemon=True)
        self._thread.start()

    def __iter__(self) -> "PrefetchIterator[T]":
        return self

    def __next__(self) -> T:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if item is _DONE:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the producer thread and release queued items."""
        self._finished = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5.0)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "PrefetchIterator[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass

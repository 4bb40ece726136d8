"""Validation of balancer options: every error names the option and what is allowed."""
from __future__ import annotations

import math
from typing import Iterable, List, Optional, Sequence, Union

Number = Union[int, float]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_float(
    name: str,
    value: object,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """A finite real number within the given bounds; ValueError naming ``name`` otherwise."""
    lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + repr(float(low))
    hi = "inf)" if high is None else repr(float(high)) + ("]" if high_inclusive else ")")
    allowed = f"a finite number in {lo}, {hi}"
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"balance option {name!r} must be {allowed}, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (v == low and not low_inclusive)):
        raise ValueError(f"balance option {name!r} must be {allowed}, got {value!r}")
    if high is not None and (v > high or (v == high and not high_inclusive)):
        raise ValueError(f"balance option {name!r} must be {allowed}, got {value!r}")
    return v


def check_int(name: str, value: object, low: Optional[int] = None) -> int:
    """An integer (not bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise ValueError(f"balance option {name!r} must be an integer{bound}, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """A bool."""
    if not isinstance(value, bool):
        raise ValueError(f"balance option {name!r} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(
            f"balance option {name!r} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
    return str(value)


def check_per_task(
    name: str,
    value: object,
    num_tasks: int,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_inclusive: bool = True,
) -> List[float]:
    """A list of ``num_tasks`` finite numbers (a single number is broadcast to every task)."""
    if hasattr(value, "tolist"):  # torch tensor or array
        value = value.tolist()  # type: ignore[union-attr]
    if _is_number(value):
        return [check_float(name, value, low, high, low_inclusive)] * num_tasks
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(
            f"balance option {name!r} must be a number or a list of {num_tasks} numbers "
            f"(one per task), got {value!r}"
        )
    items = list(value)  # type: ignore[arg-type]
    if len(items) != num_tasks:
        raise ValueError(
            f"balance option {name!r} must have one entry per task: expected {num_tasks} "
            f"numbers, got {len(items)} ({items!r})"
        )
    return [check_float(f"{name}[{i}]", x, low, high, low_inclusive) for i, x in enumerate(items)]

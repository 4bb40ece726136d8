"""Registry of balancing methods and the `make_balancer` factory."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, List, Optional, Type, TypeVar

import torch.distributed as dist

from .base import Balancer

_METHODS: Dict[str, Type[Balancer]] = {}
B = TypeVar("B", bound=Type[Balancer])


def register(name: str) -> Callable[[B], B]:
    """Class decorator: make the balancer available as ``balance.method = name``."""

    def deco(cls: B) -> B:
        if name in _METHODS:
            raise ValueError(f"balancing method {name!r} is registered twice")
        cls.method_name = name
        _METHODS[name] = cls
        return cls

    return deco


def available_methods() -> List[str]:
    """Sorted names accepted by `make_balancer`."""
    return sorted(_METHODS)


INTERNAL_ARGUMENTS = ("process_group",)
"""Constructor arguments the caller (the trainer) sets, never options of a method."""


def method_options(name: str) -> List[str]:
    """Option names accepted by method ``name`` (keyword arguments of its constructor, less
    the internal ``process_group``)."""
    cls = method_class(name)
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p not in ("self", "num_tasks", *INTERNAL_ARGUMENTS)]


def method_class(name: str) -> Type[Balancer]:
    """The class registered as ``name`` (its declarations: levels, task side, ...)."""
    if name not in _METHODS:
        raise ValueError(
            f"balance.method={name!r} is not a known method; allowed: {', '.join(available_methods())}"
        )
    return _METHODS[name]


def make_balancer(name: str, num_tasks: int, *, process_group: Optional[Any] = None, **options: Any) -> Balancer:
    """Build the balancer ``name`` for ``num_tasks`` tasks; unknown names/options raise ValueError.

    ``process_group`` (a torch.distributed ProcessGroup; None: the default group) is where the
    balance statistics are reduced: the trainer's choice, refused as a user option."""
    cls = method_class(name)
    allowed = method_options(name)
    for key in options:
        if key not in allowed:
            raise ValueError(
                f"balance option {key!r} is not valid for balance.method={name!r}; "
                f"allowed options: {', '.join(allowed) or '(none)'}"
            )
    if process_group is None:
        return cls(num_tasks, **options)
    if not isinstance(process_group, dist.ProcessGroup):
        raise ValueError(
            f"balance option 'process_group' is not valid for balance.method={name!r}: the trainer sets it, "
            f"it is not an option; allowed options: {', '.join(allowed) or '(none)'}"
        )
    return cls(num_tasks, process_group=process_group, **options)

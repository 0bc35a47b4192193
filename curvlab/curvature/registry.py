"""Backend registry: ``curvlab.make(name, model, loss_fn, **kw)`` and ``curvlab.available()``
(the names and :func:`register` are exported from ``curvlab``)."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from curvlab.curvature.base import Curvature

_BACKENDS: dict[str, type[Curvature]] = {}

C = TypeVar("C", bound=type[Curvature])


def register(name: str) -> Callable[[C], C]:
    """Class decorator: make a ``Curvature`` subclass available as ``curvlab.make(name, ...)``."""

    def decorate(cls: C) -> C:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"A backend named {name!r} is already registered.")
        if not (isinstance(cls, type) and issubclass(cls, Curvature)):
            raise TypeError(f"register({name!r}) expects a Curvature subclass, got {cls!r}.")
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return decorate


def available() -> list[str]:
    """Names of the registered backends, sorted."""
    return sorted(_BACKENDS)


def get(name: str) -> type[Curvature]:
    """The backend class registered as ``name``; a typo lists the valid names."""
    try:
        return _BACKENDS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), _BACKENDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown curvature backend {name!r}.{hint} Available: {', '.join(available())}."
        ) from None


def make(name: str, model: nn.Module, loss_fn: nn.Module, **kwargs: Any) -> Curvature:
    """Build the backend registered as ``name`` (e.g. ``"block_diagonal"``)."""
    return get(name)(model, loss_fn, **kwargs)

"""``help()`` and IDEs show every public signature: no public class or function of curvlab
(``curvlab.__all__`` and each subpackage's ``__all__``) hides its arguments behind a bare
``(*args, **kwargs)``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import curvlab

BARE = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


def _packages() -> list[ModuleType]:
    """``curvlab`` and every subpackage (a folder with ``__init__.py``) below it."""
    found = [curvlab]
    for info in pkgutil.walk_packages(curvlab.__path__, prefix="curvlab."):
        if info.ispkg:
            found.append(importlib.import_module(info.name))
    return found


def _public_callables() -> list[tuple[str, object]]:
    """``(qualified export name, object)`` of each class and function in an ``__all__``."""
    out: dict[str, object] = {}
    for package in _packages():
        for name in getattr(package, "__all__", ()):
            obj = getattr(package, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out[f"{package.__name__}.{name}"] = obj
    return sorted(out.items())


PUBLIC = _public_callables()


def test_the_walk_finds_the_subpackages_and_their_exports() -> None:
    names = {name for name, _ in PUBLIC}
    for expected in (
        "curvlab.KFAC",
        "curvlab.BlockTridiagonalKFAC",
        "curvlab.make",
        "curvlab.curvature.FactoredDamping",
        "curvlab.optim.NaturalGradient",
        "curvlab.linalg.pi_correction",
    ):
        assert expected in names, expected


def _is_called_by_users(obj: object) -> bool:
    """Not a ``typing.Protocol`` (never instantiated: its ``__init__`` is typing's
    placeholder) nor an exception (raised with a message: Python's own signature)."""
    if not inspect.isclass(obj):
        return True
    return not getattr(obj, "_is_protocol", False) and not issubclass(obj, BaseException)


CALLED = [(name, obj) for name, obj in PUBLIC if _is_called_by_users(obj)]


def test_the_filter_keeps_classes_and_functions() -> None:
    names = {name for name, _ in CALLED}
    assert "curvlab.KFAC" in names and "curvlab.make" in names
    assert "curvlab.extraction.Engine" not in names  # a Protocol
    assert "curvlab.linalg.LinAlgError" not in names  # an exception


@pytest.mark.parametrize(("name", "obj"), CALLED, ids=[name for name, _ in CALLED])
def test_public_signature_is_not_bare_args_kwargs(name: str, obj: object) -> None:
    signature = inspect.signature(obj)  # type: ignore[arg-type]
    kinds = [p.kind for p in signature.parameters.values()]
    assert not (kinds and all(kind in BARE for kind in kinds)), f"{name}{signature}"

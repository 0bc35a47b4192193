"""``module:Name`` import paths: a user's optimizer class (``--contenders``) or model
factory (``--model``), imported only when asked for."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any


def is_import_path(text: str) -> bool:
    """Whether ``text`` reads ``module:Name`` (what the command imports)."""
    return ":" in text


def import_object(spec: str) -> Any:
    """The object ``spec = "package.module:Name"`` names (``Name`` may be dotted:
    ``module:Class.factory``). Raises ``ValueError`` naming ``spec`` and what went wrong:
    a malformed path, a module that cannot be imported (or raises while importing), or a
    missing attribute."""
    module_name, _, attribute = spec.partition(":")
    module_name, attribute = module_name.strip(), attribute.strip()
    if not module_name or not attribute or ":" in attribute:
        raise ValueError(
            f"{spec!r} is not an import path: write 'package.module:Name', e.g. "
            "'torch.optim:RMSprop'."
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or anything the module raises while loading
        raise ValueError(
            f"{spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err})."
        ) from err
    for part in attribute.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{spec!r}: module {module_name!r} has no {attribute!r}.") from None
    return obj


def allow_imports_from_the_working_folder() -> None:
    """Put the current folder on ``sys.path`` (as ``python -m`` does), so that the
    ``curvlab`` console script finds a user's ``models.py`` next to their data."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)

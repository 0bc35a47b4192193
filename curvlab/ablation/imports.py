"""Imports of the research harness: a user's optimizer class (``--contenders``) or model
factory (``--model``) by ``module:Name`` path, imported only when asked for, and the
modules of the ``ablate`` extra (scikit-learn, matplotlib), which ``pip install curvlab``
leaves out."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

#: The modules of ``pip install 'curvlab[ablate]'`` the harness imports, with their
#: distribution names.
ABLATE_EXTRA = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}
INSTALL_ABLATE = "pip install 'curvlab[ablate]'"


def missing_ablate_extra() -> list[str]:
    """The distributions of the ``ablate`` extra that are not installed (``[]``: none)."""
    return [
        dist for module, dist in ABLATE_EXTRA.items() if importlib.util.find_spec(module) is None
    ]


def import_from_ablate_extra(name: str) -> Any:
    """Import module ``name`` of the ``ablate`` extra (``"matplotlib.pyplot"``,
    ``"sklearn.datasets"``); if its distribution is missing, ``ModuleNotFoundError`` names
    it and the install command."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise  # something inside the package is missing, not the package
        raise ModuleNotFoundError(
            f"curvlab's research harness needs {ABLATE_EXTRA.get(top, top)} (not installed): "
            f"{INSTALL_ABLATE}.",
            name=err.name,
        ) from err


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

"""Checkpoint files: written atomically, read with errors that name the file and the fault.

``torch.save``/``torch.load`` work too (the states are plain dicts of tensors); these two
add what a long training run needs:

* :func:`save_checkpoint` writes to a temporary file next to the target and renames it,
  so an interrupted save never leaves a truncated checkpoint behind;
* :func:`load_checkpoint` turns every way a file can be unreadable (missing, truncated, not
  a torch file, a pickle that ``weights_only`` loading refuses) into one ``ValueError``
  naming the file and the cause. Flipped bytes inside tensors are caught later, by the
  checksum that :meth:`curvlab.NaturalGradient.load_state_dict` verifies.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save(obj, path)``, atomically (a temporary file renamed into place)."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"save_checkpoint: {target} is a directory.")
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` with a clear error for an unreadable file."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"load_checkpoint: no checkpoint file at {source}.")
    try:
        return torch.load(source, map_location=map_location, weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        size = source.stat().st_size
        raise ValueError(
            f"load_checkpoint: {source} ({size} bytes) is not a readable torch checkpoint — "
            f"truncated, corrupt or another kind of file ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'})."
        ) from err

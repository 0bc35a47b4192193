"""The table of extraction engines, and how ``engine=`` picks one for a batch.

:data:`ENGINE_TABLE` is the one list of engines (:class:`~curvlab.extraction.requests.Engine`):
``engine="hooks"``/``"backpack"``/... names an entry; ``engine="auto"`` takes, among the
entries that can serve the batch, the first that is :meth:`preferred
<curvlab.extraction.requests.Engine.preferred>` for it, else the first that can serve it
(table order). Every engine says why it cannot serve a batch; a forced engine that cannot
raises a ``ValueError`` with that reason, and ``"auto"`` never computes a request with an
engine that gave one.

**Adding an engine**: one module with a class that implements the protocol, and one entry
here (or :func:`register_engine` from outside the library).
"""

from __future__ import annotations

from curvlab.extraction.backpack_engine import BackpackEngine
from curvlab.extraction.hooks import HooksEngine
from curvlab.extraction.requests import Batch, Engine

__all__ = ["ENGINE_TABLE", "check_engine", "engine_settings", "register_engine", "select_engine"]

#: Every engine ``engine=`` can name, by name; the hooks engine first: it serves every
#: batch and is ``"auto"``'s choice unless another engine is preferred.
ENGINE_TABLE: dict[str, Engine] = {
    "hooks": HooksEngine(),
    "backpack": BackpackEngine(),
}


def engine_settings() -> tuple[str, ...]:
    """The values of ``engine=``: ``"auto"`` and the name of every engine of the table."""
    return ("auto", *ENGINE_TABLE)


def check_engine(engine: object, owner: str) -> None:
    """Raise a ``ValueError`` naming ``owner`` unless ``engine`` is an ``engine=`` setting."""
    settings = engine_settings()
    if not isinstance(engine, str) or engine not in settings:
        raise ValueError(f"{owner}: unknown engine {engine!r}; choose one of {list(settings)}.")


def register_engine(engine: Engine) -> Engine:
    """Add ``engine`` to :data:`ENGINE_TABLE` under ``engine.name`` (then ``engine=name``
    selects it); a ``ValueError`` for ``"auto"`` or a name already taken."""
    name = getattr(engine, "name", None)
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(
            f"register_engine: an engine needs a name other than 'auto', got {name!r}."
        )
    if name in ENGINE_TABLE:
        raise ValueError(f"register_engine: an engine named {name!r} is already registered.")
    for method in ("unable_reason", "preferred", "run"):
        if not callable(getattr(engine, method, None)):
            raise TypeError(f"register_engine: engine {name!r} has no method {method}().")
    ENGINE_TABLE[name] = engine
    return engine


def select_engine(batch: Batch, setting: str) -> Engine:
    """The engine that answers ``batch`` under ``engine=setting`` (see the module doc).

    A ``ValueError`` with the engine's reason when a forced engine cannot serve the batch,
    or with every engine's reason when none can.
    """
    if setting != "auto":
        check_engine(setting, "extract")
        engine = ENGINE_TABLE[setting]
        reason = engine.unable_reason(batch)
        if reason is not None:
            raise ValueError(f"engine={setting!r} cannot serve this model: {reason}.")
        return engine
    able: list[Engine] = []
    reasons: list[str] = []
    for name, engine in ENGINE_TABLE.items():
        reason = engine.unable_reason(batch)
        if reason is None:
            able.append(engine)
        else:
            reasons.append(f"{name}: {reason}")
    if not able:
        raise ValueError(f"engine='auto': no engine can serve this model ({'; '.join(reasons)}).")
    return next((engine for engine in able if engine.preferred(batch)), able[0])

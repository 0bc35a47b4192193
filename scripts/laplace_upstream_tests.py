"""Run laplace-torch's own backend-parametrised tests with curvlab's backends added.

    python scripts/laplace_upstream_tests.py [--keep DIR] [--curvlab-only] [-- PYTEST_ARGS...]

The upstream test modules are vendored, unmodified, under ``scripts/laplace_upstream/``
(laplace-torch's sdist ships no tests; see the README there for the commit they come from).
They are copied into a scratch directory (``--keep DIR`` keeps it, with ``report.xml``) and
run in this process by pytest with a plugin that

* adds :class:`~curvlab.integrations.laplace.CurvlabGGN` to every ``backend``
  parametrisation that lists a laplace-torch GGN backend, and
  :class:`~curvlab.integrations.laplace.CurvlabEF` to every one that lists an EF backend
  (the test files stay untouched: the plugin extends the ``parametrize`` marks before
  pytest expands them);
* deselects the tests that are not parametrised over such backends;
* puts a stub ``torchvision`` in ``sys.modules`` (the installed one crashes on import; the
  upstream modules import ``wide_resnet50_2`` only for tests that are deselected here).

It prints, per module, passed/failed/skipped for curvlab's cells and for upstream's own
backends in the same tests, and checks curvlab's failures against ``EXPECTED_FAILURES``
both ways: an unexplained failure, and an explained one that now passes, fail the run.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
import types
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from laplace.curvature import EFInterface, GGNInterface

from curvlab.integrations.laplace import CurvlabEF, CurvlabGGN, _CurvlabInterface

UPSTREAM = Path(__file__).resolve().parent / "laplace_upstream"
CURVLAB_BACKENDS: tuple[type, ...] = (CurvlabGGN, CurvlabEF)

# curvlab's cells that fail, by node-id pattern (``*`` matches anything), with the reason.
_FUNCTIONAL = (
    "laplace-torch's FunctionalLaplace/FunctionalLLLaplace accept only its own GGN backends "
    "(`assert backend in [BackPackGGN, AsdlGGN, CurvlinopsGGN]` in their constructor)"
)
EXPECTED_FAILURES: dict[str, str] = {
    "tests/test_functional_laplace_unit.py::test_dtype[*Curvlab*]": _FUNCTIONAL,
    "tests/test_functional_laplace.py::test_gp_equivalence_classification[*Curvlab*]": _FUNCTIONAL,
}


@dataclass
class Outcomes:
    """Per-cell outcomes of one run: node id -> passed / failed / skipped."""

    outcome: dict[str, str] = field(default_factory=dict)
    curvlab: set[str] = field(default_factory=set)
    message: dict[str, str] = field(default_factory=dict)
    refused: set[str] = field(default_factory=set)  # curvlab refused last-layer/subnetwork


def _is_backend(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, (GGNInterface, EFInterface))


def _curvlab_twin(backend: Any) -> type | None:
    """curvlab's backend of the same kind as laplace-torch's ``backend`` (None: no twin)."""
    if not _is_backend(backend) or backend in CURVLAB_BACKENDS:
        return None
    return CurvlabGGN if issubclass(backend, GGNInterface) else CurvlabEF


def _backend_ids(value: Any) -> str | None:
    return value.__name__ if _is_backend(value) else None  # None: pytest's own id


def _with_curvlab(mark: pytest.Mark) -> pytest.Mark:
    """``mark`` (a ``parametrize``) with curvlab's twins of its backends appended."""
    argnames = mark.args[0]
    names = [n.strip() for n in argnames.split(",")] if isinstance(argnames, str) else argnames
    slots = [i for i, n in enumerate(names) if "backend" in n.lower()]
    if not slots:
        return mark  # its values may be a one-shot iterator: leave them unread
    values = list(mark.args[1])
    i, single = slots[0], len(names) == 1
    added: list[Any] = []
    for value in values:
        row = [value] if single else list(value)
        twin = _curvlab_twin(row[i])
        if twin is None:
            continue
        row[i] = twin
        new = row[0] if single else tuple(row)
        if new not in values and new not in added:
            added.append(new)
    if not added:
        return mark
    kwargs = dict(mark.kwargs)
    kwargs.setdefault("ids", _backend_ids)
    return pytest.mark.parametrize(argnames, values + added, **kwargs).mark


class CurvlabBackendsPlugin:
    """The pytest plugin: extends the marks, keeps the backend cells, records outcomes."""

    def __init__(self, curvlab_only: bool = False) -> None:
        self.results = Outcomes()
        self.curvlab_only = curvlab_only
        self.current = ""

    @contextmanager
    def watching_refusals(self) -> Iterator[None]:
        """Note the tests in which curvlab refuses last-layer or subnetwork Laplace (some
        upstream tests catch ``RuntimeError``, ``NotImplementedError``'s base, and pass)."""
        check = _CurvlabInterface._check_supported

        def watched(backend: _CurvlabInterface) -> None:
            try:
                check(backend)
            except NotImplementedError:
                self.results.refused.add(self.current)
                raise

        _CurvlabInterface._check_supported = watched  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            _CurvlabInterface._check_supported = check  # type: ignore[method-assign]

    def pytest_runtest_logstart(self, nodeid: str) -> None:
        self.current = nodeid

    @pytest.hookimpl(tryfirst=True)  # before pytest's own hook expands the marks
    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        marks = metafunc.definition.own_markers
        for k, mark in enumerate(marks):
            if mark.name == "parametrize":
                marks[k] = _with_curvlab(mark)

    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        keep: list[pytest.Item] = []
        drop: list[pytest.Item] = []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            backends = [v for n, v in params.items() if "backend" in n.lower() and _is_backend(v)]
            ours = any(b in CURVLAB_BACKENDS for b in backends)
            (keep if backends and (ours or not self.curvlab_only) else drop).append(item)
            if ours:
                self.results.curvlab.add(item.nodeid)
        items[:] = keep
        config.hook.pytest_deselected(items=drop)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        seen = self.results.outcome.get(report.nodeid)
        if report.failed:
            self.results.outcome[report.nodeid] = "failed"
            self.results.message.setdefault(report.nodeid, _last_line(report.longreprtext))
        elif report.skipped and seen != "failed":
            self.results.outcome[report.nodeid] = "skipped"
        elif report.when == "call" and seen is None:
            self.results.outcome[report.nodeid] = "passed"


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return (errors[-1] if errors else lines[-1] if lines else "")[:200]


def stub_torchvision() -> None:
    """Put a ``torchvision`` whose models skip the test that builds them in ``sys.modules``."""

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        pytest.skip("torchvision is stubbed: the installed one crashes on import")

    def models_getattr(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return unavailable

    torchvision = types.ModuleType("torchvision")
    models = types.ModuleType("torchvision.models")
    models.__getattr__ = models_getattr  # type: ignore[method-assign]
    torchvision.models = models  # type: ignore[attr-defined]
    sys.modules.setdefault("torchvision", torchvision)
    sys.modules.setdefault("torchvision.models", models)


def run(workdir: Path, pytest_args: Sequence[str], curvlab_only: bool = False) -> Outcomes:
    """Copy the vendored tests to ``workdir`` and run them with the plugin."""
    shutil.copytree(UPSTREAM / "tests", workdir / "tests", dirs_exist_ok=True)
    ini = workdir / "pytest.ini"
    ini.write_text("[pytest]\n")  # not curvlab's settings, even with --keep inside the repo
    plugin = CurvlabBackendsPlugin(curvlab_only)
    stub_torchvision()
    args = [
        "-c", str(ini), "--rootdir", str(workdir), "-p", "no:cacheprovider",
        "-q", "--tb=short", "--disable-warnings", "--junitxml", str(workdir / "report.xml"),
        *pytest_args, str(workdir / "tests"),
    ]  # fmt: skip
    with plugin.watching_refusals():
        code = pytest.main(args, plugins=[plugin])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        raise SystemExit(f"pytest stopped: {code!r}")
    return plugin.results


def _module(nodeid: str) -> str:
    return nodeid.split("::")[0].rsplit("/", 1)[-1]


def _matches(nodeid: str, pattern: str) -> bool:
    """``pattern`` with ``*`` as the only wildcard (node ids have brackets)."""
    return re.fullmatch(".*".join(map(re.escape, pattern.split("*"))), nodeid) is not None


def _reason(nodeid: str) -> str | None:
    return next((r for p, r in EXPECTED_FAILURES.items() if _matches(nodeid, p)), None)


def summary(results: Outcomes) -> int:
    """Print the table and the failures of curvlab's cells; the number of surprises."""
    counts: dict[tuple[str, bool], Counter[str]] = {}
    for nodeid, outcome in results.outcome.items():
        ours = nodeid in results.curvlab
        c = counts.setdefault((_module(nodeid), ours), Counter())
        c[outcome] += 1
        c["refused"] += ours and outcome == "passed" and nodeid in results.refused
    header = f"{'module':34} {'curvlab p/f/s':>14} {'(p refused)':>11} {'upstream p/f/s':>15}"
    print("\n" + header + "\n" + "-" * len(header))
    total = {True: Counter[str](), False: Counter[str]()}
    for module in [*sorted({m for m, _ in counts}), "total"]:
        row = {o: total[o] if module == "total" else counts.get((module, o), Counter())
               for o in (True, False)}  # fmt: skip
        if module != "total":
            for o in (True, False):
                total[o].update(row[o])
        p_f_s = {o: f"{row[o]['passed']}/{row[o]['failed']}/{row[o]['skipped']}" for o in row}
        print(f"{module:34} {p_f_s[True]:>14} {row[True]['refused']:>11} {p_f_s[False]:>15}")

    surprises = 0
    explained: Counter[str] = Counter()
    for nodeid in sorted(results.curvlab):
        got, reason = results.outcome.get(nodeid), _reason(nodeid)
        if got == "failed" and reason is None:
            surprises += 1
            print(f"UNEXPLAINED FAILURE {nodeid}\n    {results.message.get(nodeid, '')}")
        elif got == "failed":
            explained[reason or ""] += 1
        elif got == "passed" and reason is not None:
            surprises += 1
            print(f"EXPECTED FAILURE PASSES {nodeid} ({reason})")
    if explained:
        print("\ncurvlab's expected failures:")
        for why, n in explained.items():
            print(f"  {n:4d}  {why}")
    upstream_failed = [n for n, o in results.outcome.items() if o == "failed" and
                       n not in results.curvlab]  # fmt: skip
    if upstream_failed:
        print(f"\nupstream's own backends fail {len(upstream_failed)} cells:")
        for nodeid in sorted(upstream_failed):
            print(f"  {nodeid}\n      {results.message.get(nodeid, '')}")
    return surprises


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keep", type=Path, help="run in DIR and keep it (default: a temp dir)")
    parser.add_argument(
        "--curvlab-only", action="store_true", help="run curvlab's cells only (a minute)"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    options = parser.parse_args(list(argv) if argv is not None else None)
    if options.keep is not None:
        options.keep.mkdir(parents=True, exist_ok=True)
        results = run(options.keep.resolve(), options.pytest_args, options.curvlab_only)
    else:
        with tempfile.TemporaryDirectory(prefix="laplace_upstream_") as tmp:
            results = run(Path(tmp), options.pytest_args, options.curvlab_only)
    return 1 if summary(results) else 0


if __name__ == "__main__":
    sys.exit(main())

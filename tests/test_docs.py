"""The docs stay true: concept pages' code runs, every public name is documented."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import curvlab

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [*sorted((DOCS / "concepts").glob("*.md")), DOCS / "ablate.md", DOCS / "index.md"]


@pytest.mark.parametrize(
    "page",
    [
        # the block-tridiagonal page trains four optimizers (about 20 s): `make test-slow`
        pytest.param(
            p, id=p.stem, marks=[pytest.mark.slow] if p.stem == "block_tridiagonal" else []
        )
        for p in PAGES
    ],
)
def test_page_code_runs(page: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks, f"{page.name} has no executable example"
    namespace: dict[str, object] = {}
    for block in blocks:  # blocks of one page share a namespace, like a notebook
        exec(compile(block, str(page), "exec"), namespace)


PUBLIC = [("curvlab", curvlab), ("curvlab.ablation", curvlab.ablation)]


@pytest.mark.parametrize(("prefix", "module"), PUBLIC, ids=[p for p, _ in PUBLIC])
def test_every_public_name_is_in_the_api_reference(prefix, module) -> None:
    api = (DOCS / "api.rst").read_text()
    missing = [
        name
        for name in module.__all__
        if not re.search(rf"{re.escape(prefix)}\.{re.escape(name)}\b", api)
        and name != "__version__"
    ]
    assert not missing, f"undocumented public names of {prefix}: {missing}"


@pytest.mark.parametrize(("prefix", "module"), PUBLIC, ids=[p for p, _ in PUBLIC])
def test_every_public_name_has_a_docstring(prefix, module) -> None:
    undocumented = [
        name
        for name in module.__all__
        if not isinstance(getattr(module, name), (tuple, str))
        and not (getattr(module, name).__doc__ or "").strip()
    ]
    assert not undocumented, f"{prefix}: {undocumented}"


CITATION = re.compile(r"concepts/([a-z_]+)\.md(?:#([a-z0-9-]+))?")
SOURCES = [
    p
    for folder in ("curvlab", "tests", "examples", "benchmarks", "docs")
    for p in (DOCS.parent / folder).rglob("*")
    if p.suffix in (".py", ".md", ".rst")
    and "_build" not in p.parts
    and "auto_examples" not in p.parts
] + [DOCS.parent / "README.md"]


#: The team's own notes (outside the repository), which nothing may cite.
TEAM_NOTES = r"\b(" + "|".join(("MATH", "DESIGN")) + r")\.md\b"


def _slug(title: str) -> str:
    title = re.sub(r"[^a-z0-9 -]", "", title.lower().replace("–", "-"))
    return re.sub(r"\s+", "-", title.strip())


def test_every_citation_points_to_a_page_and_section_that_exist() -> None:
    broken, foreign = [], []
    for path in SOURCES:
        text = path.read_text()
        if re.search(TEAM_NOTES, text):
            foreign.append(path.name)  # the team's notes are not part of the product
        for page, section in CITATION.findall(text):
            target = DOCS / "concepts" / f"{page}.md"
            if not target.exists():
                broken.append(f"{path.name}: concepts/{page}.md")
                continue
            headings = {_slug(h) for h in re.findall(r"^#+ (.+)$", target.read_text(), re.M)}
            if section and section not in headings:
                broken.append(f"{path.name}: concepts/{page}.md#{section}")
    assert not foreign, f"files citing the team's notes: {foreign}"
    assert not broken, broken

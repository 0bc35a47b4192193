"""Sphinx configuration for curvlab's docs (``make docs`` builds with warnings as errors)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MPLBACKEND", "Agg")

import curvlab  # noqa: E402

project = "curvlab"
author = "the curvlab developers"
release = curvlab.__version__
copyright = "2026, the curvlab developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
    "sphinx_gallery.gen_gallery",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = [
    "_build",
    "_static",  # generated files shown by pages (the committed `curvlab ablate` run)
    "auto_examples/*.ipynb",
    "auto_examples/*.py",
    "**.zip",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_typehints = "description"
autodoc_member_order = "bysource"
napoleon_google_docstring = True
nitpicky = False

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"distributed",
    "download_all_examples": False,
    "remove_config_comments": True,
}

html_theme = "furo"
html_title = f"curvlab {release}"
suppress_warnings = ["config.cache"]

"""Sphinx configuration for curvlab's docs (``make docs`` builds with warnings as errors)."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx_gallery.sorting import ExplicitOrder

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
# quotes and ellipses only: `--` stays two hyphens (a command-line flag such as --lr
# outside code formatting would otherwise render as an en-dash)
smartquotes_action = "qe"

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"distributed",
    "download_all_examples": False,
    "remove_config_comments": True,
    # the Quickstart first, then a reading order (sphinx-gallery's default is by length);
    # a tutorial missing from this list comes after the listed ones
    "within_subsection_order": ExplicitOrder(
        [
            "plot_quickstart.py",
            "plot_natural_gradient_training.py",
            "plot_any_model.py",
            "plot_kfc_convnet.py",
            "plot_spectrum.py",
            "plot_ablation.py",
            "plot_laplace.py",
            "plot_noisy_kfac.py",
            "plot_influence.py",
            "plot_new_backend.py",
            "plot_kronecker_identities.py",
            "*",
        ]
    ),
}

html_theme = "furo"
html_title = f"curvlab {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]  # code blocks wrap long lines instead of hiding them
suppress_warnings = ["config.cache"]


def _constant_docstring(app, what, name, obj, options, lines) -> None:
    """A re-exported constant (``curvlab.ablation.MODELS``, defined in
    ``curvlab.ablation.data``) shows the ``#:`` comment of its definition, not the
    docstring of its type (``tuple``'s "Built-in immutable sequence")."""
    type_doc = type(obj).__doc__
    if what not in ("data", "attribute") or not lines or not isinstance(type_doc, str):
        return
    if lines[0].strip() != inspect.cleandoc(type_doc).splitlines()[0].strip():
        return
    attr = name.rsplit(".", 1)[-1]
    for modname, module in sorted(sys.modules.items()):
        if modname.split(".")[0] != "curvlab" or getattr(module, attr, None) is not obj:
            continue
        try:
            comment = ModuleAnalyzer.for_module(modname).find_attr_docs().get(("", attr))
        except PycodeError:
            continue
        if comment:
            lines[:] = list(comment)
            return
    lines[:] = []  # no comment anywhere: the value alone says more than tuple's docstring


def setup(app) -> None:
    app.connect("autodoc-process-docstring", _constant_docstring)

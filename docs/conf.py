"""Sphinx configuration for dropnorm's documentation site.

Build: ``pip install -e ".[docs]" && sphinx-build -W -b html docs docs/_build/html``.
Nothing is fetched over the network at build time (no remote intersphinx).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import dropnorm  # noqa: E402

project = "dropnorm"
author = "The dropnorm authors"
copyright = "2026, The dropnorm authors"
release = dropnorm.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
# docs/results/*.md are the study's own outputs; results.md lists them in a hidden toctree.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: GitHub-style heading anchors so that links like guides/nnx.md#flax-nnx work.
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc + napoleon: Google-style docstrings (Args:, Returns:, Raises:, Examples:).
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Types go next to the parameters a docstring describes (linen fields are its Attributes).
autodoc_typehints_description_target = "documented"
# Members are listed in the API pages themselves; a NamedTuple's fields are its Attributes section.
autodoc_default_options: dict = {}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("References", "notes_style")]

# The doctest builder runs the ``>>>`` examples of every docstring shown in the API pages.
doctest_global_setup = "import jax, jax.numpy as jnp, numpy as np, dropnorm"

html_theme = "sphinx_book_theme"
html_title = f"dropnorm {release}"
html_static_path = ["_static"]
html_logo = "_static/logo.svg"
html_css_files = ["dropnorm.css"]
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

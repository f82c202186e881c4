"""Sphinx configuration: the docs/ pages (Markdown, through MyST) and the API
reference generated from the docstrings. Built in CI with warnings as errors:

    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

from __future__ import annotations

from pygments.lexers.special import TextLexer
from sphinx.highlighting import lexers

import chatcore

# Diagrams are mermaid source: shown as text (GitHub renders them).
lexers["mermaid"] = TextLexer()

project = "chatcore"
release = chatcore.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.intersphinx"]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "images"]
# Links like [text](protocol.md#errors) resolve to the heading's anchor.
myst_heading_anchors = 4
myst_enable_extensions = ["colon_fence"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections as fields: the attributes' own #: comments document them.
napoleon_use_ivar = True
intersphinx_mapping = {}
html_theme = "alabaster"
html_static_path: list[str] = []

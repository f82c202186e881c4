"""``chatcore new DIR``: write a small chat app, its page and its tests.

The files come from ``template/`` in this package (the example chat of the
chatcore repository, with its package name replaced by the user's own), so
they work from an installed wheel, without a checkout. The page itself,
``template/static/``, is the one the repository's ``examples/chat/static``
links to; a test keeps the Python files equal to the example's.
"""

from __future__ import annotations

import keyword
import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

__all__ = ["new_app", "package_name"]

#: What the templates call the package.
PLACEHOLDER = "{package}"


def package_name(directory: Path) -> str:
    """A Python package name made from ``directory``'s name (``My Chat`` -> ``my_chat``).

    Raises:
        ValueError: nothing usable is left of the name.
    """
    name = re.sub(r"\W+", "_", directory.resolve().name.lower()).strip("_")
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"cannot make a package name from {directory.name!r}: use --package")
    return name


def _files(template: Traversable, prefix: str = "") -> list[tuple[str, Traversable]]:
    found: list[tuple[str, Traversable]] = []
    for entry in sorted(template.iterdir(), key=lambda e: e.name):
        if entry.is_dir():
            found += _files(entry, f"{prefix}{entry.name}/")
        elif not entry.name.endswith((".pyc", ".pyo")):
            found.append((prefix + entry.name, entry))
    return found


def render(package: str) -> dict[str, str]:
    """The files of a new app: ``{relative path: text}``."""
    layout = {
        "app.py.tmpl": f"{package}/app.py",
        "token.py.tmpl": f"{package}/token.py",
        "pages.py.tmpl": f"{package}/pages.py",
        "test_app.py.tmpl": f"test_{package}.py",
        "pyproject.toml.tmpl": "pyproject.toml",
        "README.md.tmpl": "README.md",
    }
    out = {f"{package}/__init__.py": f'"""{package}: a chatcore chat server."""\n'}
    for name, entry in _files(resources.files(__name__).joinpath("template")):
        text = entry.read_text(encoding="utf-8")
        if name.startswith("static/"):
            out[f"{package}/{name}"] = text  # no names in the page: copied as is
        else:
            out[layout[name]] = text.replace(PLACEHOLDER, package)
    return out


def new_app(directory: Path, package: str | None = None) -> list[Path]:
    """Write a new chat app into ``directory`` (created; it must not hold files yet).

    Args:
        directory: Where to write. Becomes ``directory/PACKAGE/`` (the app),
            ``directory/test_PACKAGE.py``, ``pyproject.toml`` and ``README.md``.
        package: The package's name; default: made from ``directory``'s name.

    Returns:
        The files written.

    Raises:
        FileExistsError: ``directory`` exists and is not empty.
        ValueError: ``package`` is not a usable Python package name.
    """
    package = package or package_name(directory)
    if not package.isidentifier() or keyword.iskeyword(package):
        raise ValueError(f"{package!r} is not a Python package name")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty")
    written = []
    for relative, text in render(package).items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written

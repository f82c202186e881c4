"""A static guard: ``chatcore.sansio`` stays pure (stdlib + attrs, no I/O, no clock, no dice).

Every ``.py`` file under ``chatcore/sansio`` is parsed with :mod:`ast` (never
imported), so the guard also catches code that is not reached by any test.
The checker itself is tested on small sources below, so a guard that silently
stopped looking would fail too.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SANSIO = Path(__file__).resolve().parent.parent / "chatcore" / "sansio"

#: Third-party distributions the pure layer may use.
ALLOWED_THIRD_PARTY = frozenset({"attrs"})

#: Standard-library modules that do I/O, concurrency or process control: none of
#: that belongs in a layer that is "data in, data out".
FORBIDDEN_STDLIB = frozenset(
    {
        "asyncio",
        "concurrent",
        "ftplib",
        "http.client",
        "http.server",
        "importlib",
        "multiprocessing",
        "random",
        "secrets",
        "select",
        "selectors",
        "signal",
        "smtplib",
        "socket",
        "socketserver",
        "ssl",
        "subprocess",
        "threading",
        "urllib.request",
    }
)

#: Dotted names that read a clock, sleep, or draw randomness. A use of any of
#: these (or of anything under them) is a violation, however it was imported.
FORBIDDEN_NAMES = frozenset(
    {
        "time.time",
        "time.time_ns",
        "time.monotonic",
        "time.monotonic_ns",
        "time.perf_counter",
        "time.perf_counter_ns",
        "time.process_time",
        "time.process_time_ns",
        "time.thread_time",
        "time.thread_time_ns",
        "time.clock_gettime",
        "time.clock_gettime_ns",
        "time.sleep",
        "time.localtime",
        "time.gmtime",
        "time.ctime",
        "time.asctime",
        "time.strftime",
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
        "os.urandom",
        "os.getrandom",
        "os.times",
        "uuid.uuid1",
        "uuid.uuid4",
        "random",
        "secrets",
    }
)

#: Builtins that do I/O or import dynamically (``print`` is allowed: the
#: ``__main__`` tool writes its diagram to stdout).
FORBIDDEN_BUILTINS = frozenset({"open", "input", "__import__", "exec", "eval", "breakpoint"})


def _module_allowed(module: str) -> str | None:
    """Why an absolute import of ``module`` is not allowed, or None if it is."""
    top = module.partition(".")[0]
    for forbidden in FORBIDDEN_STDLIB:
        if module == forbidden or module.startswith(forbidden + "."):
            return f"stdlib module {module!r} does I/O, concurrency or randomness"
    if top in sys.stdlib_module_names or top in ALLOWED_THIRD_PARTY:
        return None
    return f"{module!r} is neither stdlib nor one of {sorted(ALLOWED_THIRD_PARTY)}"


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b.c`` as ["a", "b", "c"]; None for anything that is not a plain name chain."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return parts[::-1]
    return None


def _forbidden(qualified: str) -> bool:
    return any(qualified == f or qualified.startswith(f + ".") for f in FORBIDDEN_NAMES)


def violations(source: str, path: Path) -> list[str]:
    """Every purity violation in ``source``, a file at ``path`` under ``SANSIO``."""
    tree = ast.parse(source, filename=str(path))
    # How deep below chatcore/sansio the file's package is: a relative import
    # may climb that many levels (plus the level that names its own package).
    depth = len(path.relative_to(SANSIO).parts) - 1
    where = path.relative_to(SANSIO.parent.parent)
    found: list[str] = []
    # Local name -> the dotted name it stands for, from this file's imports.
    aliases: dict[str, str] = {}

    def report(node: ast.AST, message: str) -> None:
        found.append(f"{where}:{getattr(node, 'lineno', '?')}: {message}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (why := _module_allowed(alias.name)) is not None:
                    report(node, why)
                if alias.asname:
                    aliases[alias.asname] = alias.name
                else:
                    top = alias.name.partition(".")[0]
                    aliases[top] = top
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                assert node.module is not None
                if (why := _module_allowed(node.module)) is not None:
                    report(node, why)
                for alias in node.names:
                    qualified = f"{node.module}.{alias.name}"
                    aliases[alias.asname or alias.name] = qualified
                    if _forbidden(qualified):
                        report(node, f"imports {qualified} (clock or randomness)")
            elif node.level - 1 > depth:
                dots = "." * node.level
                report(node, f"relative import 'from {dots}{node.module or ''}' leaves sansio")

    # Inner links of a chain (the ``time`` of ``time.monotonic``) are skipped,
    # so each use is judged, and reported, once, by its full dotted name.
    inner = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS:
            report(node, f"uses builtin {node.id}()")
        if not isinstance(node, ast.Attribute | ast.Name) or id(node) in inner:
            continue
        parts = _dotted(node)
        if parts is None or parts[0] not in aliases:
            continue
        qualified = ".".join([aliases[parts[0]], *parts[1:]])
        if _forbidden(qualified):
            report(node, f"uses {qualified} (clock or randomness)")
    return found


def sansio_files() -> list[Path]:
    return sorted(SANSIO.rglob("*.py"))


# -- the real tree -------------------------------------------------------------------


def test_there_is_something_to_check() -> None:
    names = {p.name for p in sansio_files()}
    assert {"__init__.py", "_state.py", "_outbox.py", "_handshake.py", "_errors.py"} <= names


@pytest.mark.parametrize("path", sansio_files(), ids=lambda p: p.relative_to(SANSIO).as_posix())
def test_sansio_is_pure(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8"), path) == []


# -- the checker catches what it must ---------------------------------------------------

STATE = SANSIO / "_state.py"
NESTED = SANSIO / "sub" / "_mod.py"


@pytest.mark.parametrize(
    "source",
    [
        "import trio",
        "import trio.lowlevel",
        "from trio import sleep",
        "import anyio",
        "import chatcore",
        "from chatcore import Config",
        "from chatcore.sansio import _state",  # must be relative
        "import socket",
        "import asyncio",
        "from http.client import HTTPConnection",
        "import urllib.request",
        "import random",
        "from random import choice",
        "import secrets",
        "import importlib",
        "from concurrent.futures import ThreadPoolExecutor",
        "import attr",  # attrs' legacy namespace: spell it attrs
        "from .. import _config",
        "from .._config import Config",
        "from ..transports import _memory",
        "import time\ntime.time()",
        "import time\nx = time.monotonic",
        "import time as t\nt.perf_counter()",
        "from time import monotonic\nmonotonic()",
        "from time import monotonic as now",
        "import time\ntime.sleep(1)",
        "import datetime\ndatetime.datetime.now()",
        "from datetime import datetime\ndatetime.now()",
        "from datetime import datetime as dt\ndt.utcnow()",
        "from datetime import date\ndate.today()",
        "import os\nos.urandom(8)",
        "import uuid\nuuid.uuid4()",
        "open('x')",
        "__import__('trio')",
        "def f():\n    import trio",
        "if False:\n    import trio",
    ],
)
def test_checker_flags(source: str) -> None:
    assert violations(source, STATE) != []


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import attrs",
        "from attrs import frozen, field",
        "import attrs.validators",
        "import enum, json, functools",
        "from collections import deque",
        "from http.cookies import SimpleCookie",
        "from urllib.parse import parse_qs",
        "from . import _state",
        "from ._state import TRANSITIONS",
        "import time\nx: time.struct_time",  # a type is not a clock read
        "from datetime import timedelta\ntimedelta(seconds=1)",
        "import datetime\ndatetime.datetime.fromtimestamp(0)",  # a value passed in, not read
        "def f(now: float) -> float:\n    return now + 1",
        "print('diagram')",
    ],
)
def test_checker_allows(source: str) -> None:
    assert violations(source, STATE) == []


def test_relative_imports_may_climb_only_to_sansio() -> None:
    assert violations("from .. import _state", NESTED) == []
    assert violations("from .._outbox import Outbox", NESTED) == []
    assert violations("from ... import _config", NESTED) != []


def test_violation_messages_name_the_file_and_line() -> None:
    (message,) = violations('"""doc"""\n\nimport trio\n', STATE)
    assert message.startswith("chatcore/sansio/_state.py:3: ")
    assert "trio" in message

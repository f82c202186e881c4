"""The docs that name tests as proof (design.md, deploy.md, transports.md) name real ones.

A renamed or deleted test would otherwise leave a trap table pointing at
nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = ["docs/design.md", "docs/deploy.md", "docs/transports.md"]
DEFINED = {
    name
    for path in (ROOT / "tests").glob("test_*.py")
    for name in re.findall(r"^(?:async )?def (test_\w+)", path.read_text(), re.MULTILINE)
}


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_test_exists(doc: str) -> None:
    cited = set(re.findall(r"`(test_\w+)`", (ROOT / doc).read_text()))
    assert cited, f"{doc} cites no test"
    assert sorted(cited - DEFINED) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_cited_test_file_exists(doc: str) -> None:
    cited = set(re.findall(r"tests/(test_\w+\.py)", (ROOT / doc).read_text()))
    assert sorted(name for name in cited if not (ROOT / "tests" / name).exists()) == []

"""scripts/test_report.py: the last lines of ``scripts/test`` (skips, and the coverage floor)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_report() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "test_report", ROOT / "scripts" / "test_report.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def skip_file(tmp_path: Path, *reasons: str) -> Path:
    path = tmp_path / "skips.jsonl"
    path.write_text(
        "".join(json.dumps({"test": f"t{i}", "reason": r}) + "\n" for i, r in enumerate(reasons))
    )
    return path


REDIS = "redis-server is not installed (apt-get install redis-server)"
CHROMIUM = "chromium is missing (apt-get install chromium) - needed for browser tests"


def test_skips_are_summed_up_last_with_what_to_install(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    report = skip_file(tmp_path, REDIS, REDIS, CHROMIUM)
    assert load_report().main([str(report), "92"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [
        "== scripts/test: 3 tests skipped:",
        f"     2  {REDIS}",
        f"     1  {CHROMIUM}",
        "Coverage floor (92 %) not checked: skipped tests leave code unmeasured.",
        "For the full run: apt-get install chromium redis-server, then scripts/test again.",
    ]


def test_in_ci_nothing_may_skip(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    assert load_report().main([str(skip_file(tmp_path, "needs 100000 open files")), "92"]) == 1
    assert "CI=true: every test must run here" in capsys.readouterr().out


def test_without_skips_the_floor_is_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    report = load_report()

    class Done:
        def __init__(self, returncode: int, stdout: str) -> None:
            self.returncode, self.stdout, self.stderr = returncode, stdout, "below"

    def run(argv: list[str], **_: object) -> Done:  # `coverage report --fail-under=N`
        return Done(0 if argv[-1] == "--fail-under=90" else 2, "91\n")

    monkeypatch.setattr(report.subprocess, "run", run)
    empty = tmp_path / "none.jsonl"  # no skip was written
    assert report.main([str(empty), "90"]) == 0
    assert "nothing skipped; coverage 91 % >= 90 %" in capsys.readouterr().out
    assert report.main([str(empty), "92"]) == 1
    assert "coverage 91 % is below the floor of 92 %" in capsys.readouterr().out

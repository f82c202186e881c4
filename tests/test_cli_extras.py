"""The small things a newcomer meets first on the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import chatcore
from chatcore._cli import build_app, main

ROOT = Path(__file__).resolve().parent.parent


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"chatcore {chatcore.__version__}\n"


def test_a_class_instead_of_an_instance_gets_a_hint() -> None:
    with pytest.raises(
        SystemExit, match=r"Hub is a class; serve an instance of it: add `handler = Hub\(\)`"
    ):
        build_app(chatcore.Hub)
    with pytest.raises(SystemExit, match="is not a chatcore Hub, ASGIApp or ConnectionHandler"):
        build_app(int)


def test_redis_url_without_the_extra_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coredis", None)  # import coredis -> ImportError
    with pytest.raises(SystemExit, match=r"pip install 'chatcore\[redis\]'"):
        main(["serve", "examples.chat.app:app", "--redis-url", "redis://127.0.0.1:1"])
    assert "CHATCORE_REDIS_URL" not in os.environ


def test_an_early_exit_of_serve_leaves_sigterm_unblocked(monkeypatch: pytest.MonkeyPatch) -> None:
    # serve blocks SIGTERM while the target imports; a process that goes on
    # after an early exit (and every child it starts) must get it back.
    monkeypatch.setitem(sys.modules, "coredis", None)
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    with pytest.raises(SystemExit, match="chatcore"):
        main(["serve", "examples.chat.app:app", "--redis-url", "redis://127.0.0.1:1"])
    assert signal.SIGTERM not in before
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before


@pytest.mark.parametrize(("worker", "warned"), [(None, True), ("1", False)])
def test_the_dev_mode_warning_is_printed_once_per_server(worker: str | None, warned: bool) -> None:
    """Workers of ``chatcore serve --workers N`` have CHATCORE_WORKER set: they keep quiet."""
    env = {k: v for k, v in os.environ.items() if k not in ("CHAT_SECRET", "CHATCORE_WORKER")}
    if worker is not None:
        env["CHATCORE_WORKER"] = worker
    done = subprocess.run(
        [sys.executable, "-c", "import examples.chat.app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ("DEV MODE" in done.stderr) is warned, done.stderr

"""The README's quickstart commands work, exactly as written.

The commands are parsed from the ```` ```sh ```` blocks under "## Quickstart"
in README.md, so this breaks when the README changes without the code (or the
other way round):

1. the run command, from a fresh ``git clone`` of this repository's HEAD in a
   fresh venv (committed state only: uncommitted changes are not in the
   clone). It needs PyPI for ``pip install``. It must serve on the address the
   README names, where a WebSocket client exchanges a message; then SIGTERM
   stops it.
2. the test command: it exists and is what ``.ci/run`` runs (it is not run
   here, that would run this suite recursively).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() == "true"

#: Bounds, in seconds.
INSTALL_AND_START = 300.0  # venv + pip install from PyPI + the server listening
STOP = 30.0  # the server gone after SIGTERM


def quickstart(readme: Path) -> tuple[list[str], str]:
    """The Quickstart section's ``sh`` commands, and the section's text."""
    text = readme.read_text(encoding="utf-8")
    match = re.search(r"^## Quickstart\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, f"{readme} has no '## Quickstart' section"
    section = match.group(1)
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    return [block.strip() for block in blocks], section


def run_and_test_commands(readme: Path) -> tuple[str, str, str]:
    """(the run command, the test command, the ws:// URL the README promises)."""
    commands, section = quickstart(readme)
    assert len(commands) == 2, f"expected a run and a test command, got {commands}"
    for command in commands:
        assert "\n" not in command, f"expected one line per command, got {command!r}"
    urls = re.findall(r"ws://[^\s`)]+", section)
    assert urls, "the Quickstart does not say where the server listens (ws://...)"
    return commands[0], commands[1], urls[0]


def test_readme_test_command_is_what_ci_runs() -> None:
    _, test_command, _ = run_and_test_commands(ROOT / "README.md")
    script = ROOT / test_command.split()[0]
    assert script.is_file(), f"{script} does not exist"
    assert os.access(script, os.X_OK), f"{script} is not executable"
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert test_command in ci_lines, f".ci/run does not run {test_command!r}: {ci_lines}"


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        # Like the server: connections of an earlier run in TIME_WAIT do not count.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process is left in process group ``pgid``."""
    proc = Path("/proc")
    if not proc.is_dir():  # pragma: no cover  (not Linux: zombies count as alive)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid pgrp ...": comm may contain spaces and ")".
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def _messages(ws: Any) -> Iterator[dict[str, Any]]:
    """Every message arriving on ``ws`` (a frame holds JSON lines); 10 s per frame."""
    while True:
        for line in ws.recv(timeout=10).split("\n"):
            yield json.loads(line)


def _exchange(url: str) -> None:
    """Connect, send a message, and see it come back (echo or protocol v1)."""
    text = "hello from the README test"
    # The example authenticates by user name (dev mode: no token needed).
    with connect(url + "?user=readme", open_timeout=10, close_timeout=5) as ws:
        inbox = _messages(ws)
        hello = next(inbox)
        assert hello["type"] == "hello", hello
        if "protocol" in hello:  # a protocol-v1 hub: join, then publish
            ws.send(json.dumps({"type": "join", "room": "readme", "ref": 1}))
            ws.send(json.dumps({"type": "publish", "room": "readme", "data": text, "ref": 2}))
        else:  # the echo example: every text comes back to everyone
            ws.send(text)
        for message in inbox:
            if message["type"] in ("presence_state", "presence_diff"):
                continue  # the example tracks presence
            assert message["type"] in ("reply", "message"), message
            assert message.get("status", "ok") == "ok", message
            if message["type"] == "message":
                assert message["data"] == text
                return


@pytest.mark.slow
def test_readme_run_command_from_a_fresh_clone(tmp_path: Path) -> None:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        reason = "needs git and a git checkout to clone"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)
    clone = tmp_path / "chatcore"
    subprocess.run(
        [git, "clone", "--quiet", str(ROOT), str(clone)],
        check=True,
        timeout=60,
        capture_output=True,
    )
    run_command, _, url = run_and_test_commands(clone / "README.md")
    host, port = re.match(r"ws://([^:/]+):(\d+)", url).groups()  # type: ignore[union-attr]
    assert host == "127.0.0.1", f"the README's server should listen on loopback, not {host}"
    if not _port_is_free(host, int(port)):
        reason = f"{host}:{port}, where the README's server listens, is busy"
        if IN_CI:
            pytest.fail(reason)
        pytest.skip(reason)

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONUNBUFFERED="1")
    log = tmp_path / "output.log"
    with log.open("wb") as out:
        # A session of its own: the command is a shell pipeline, so SIGTERM goes
        # to its process group (whose id is this PID), reaching the server itself.
        process = subprocess.Popen(
            ["bash", "-c", run_command],
            cwd=clone,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    pgid = process.pid
    try:
        deadline = time.monotonic() + INSTALL_AND_START
        while True:
            if process.poll() is not None:
                pytest.fail(f"the run command exited with {process.returncode}:\n{log.read_text()}")
            try:
                _exchange(url)
                break
            except InvalidStatus as exc:
                pytest.fail(
                    f"the README's URL {url} was refused with HTTP "
                    f"{exc.response.status_code}:\n{log.read_text()}"
                )
            except (OSError, TimeoutError) as exc:  # not listening yet
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no WebSocket on {url} within {INSTALL_AND_START:g}s ({exc!r}):\n"
                        f"{log.read_text()}"
                    )
                time.sleep(0.5)
        assert f"{host}:{port}" in log.read_text(), "the server did not print its address"
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP
        while _group_alive(pgid) and time.monotonic() < deadline:
            process.poll()  # reap the shell if it is done
            time.sleep(0.1)
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
            process.wait(timeout=10)
            pytest.fail(f"the server ignored SIGTERM for {STOP:g}s:\n{log.read_text()}")
        process.wait(timeout=10)
    output = log.read_text()
    assert "Traceback" not in output, output


async def test_the_taste_runs_as_the_readme_says(
    tmp_path: Path, connect: Any, autojump_clock: Any
) -> None:
    """The README's "A taste" block is a module ``chatcore serve taste:handler`` accepts."""
    import sys

    from chatcore._cli import build_app, load_target

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## A taste\n.*?^```python\n(.*?)^```\n(.*?)^## ", text, re.M | re.S)
    assert match, "README.md has no '## A taste' python block"
    code, after = match.groups()
    assert "chatcore serve taste:handler" in after
    (tmp_path / "taste.py").write_text(code, encoding="utf-8")
    sys.path.insert(0, str(tmp_path))
    try:
        handler = load_target("taste:handler")
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("taste", None)
    build_app(handler)  # what `chatcore serve` does with it
    (_, alice), (_, bob) = await connect(handler), await connect(handler)
    await alice.send("hello")
    for client in (alice, bob):
        assert json.loads(await client.receive()) == {"type": "message", "data": "hello"}

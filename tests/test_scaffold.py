"""``chatcore new DIR``: the app it writes, and the tutorial from an installed wheel.

The templates are the example chat with its package name taken out; a test
renders them back as ``examples.chat`` and compares with the repository's
files, so the two never drift apart. The slow test builds a wheel, installs
it into a fresh virtual environment (its dependencies come from the test
environment, so nothing is downloaded), runs ``chatcore new`` there and the
tests it wrote.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from chatcore._cli import main
from chatcore._scaffold import new_app, package_name, render

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "chat"


def test_the_templates_are_the_example_chat() -> None:
    files = render("examples.chat")
    for relative in (
        "app.py",
        "token.py",
        "pages.py",
        *(f"static/{p.name}" for p in (EXAMPLE / "static").iterdir()),
    ):
        assert files[f"examples.chat/{relative}"] == (EXAMPLE / relative).read_text(
            encoding="utf-8"
        ), relative
    # The tests it writes are the tutorial's.
    tutorial = (ROOT / "docs" / "tutorial.md").read_text(encoding="utf-8")
    (block,) = re.findall(
        r"^<!-- test: .+? -->\n```\w*\n(.*?)^```", tutorial, re.MULTILINE | re.DOTALL
    )
    assert render("chat")["test_chat.py"] == block


def test_new_writes_the_users_own_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "Team Chat"
    assert main(["new", str(target)]) == 0
    assert "chatcore serve team_chat.app:app" in capsys.readouterr().out
    written = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert written == [
        "README.md",
        "pyproject.toml",
        "team_chat/__init__.py",
        "team_chat/app.py",
        "team_chat/pages.py",
        "team_chat/static/app.js",
        "team_chat/static/favicon.svg",
        "team_chat/static/index.html",
        "team_chat/static/style.css",
        "team_chat/token.py",
        "test_team_chat.py",
    ]
    for path in target.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "examples" not in text, path
            assert "{package}" not in text, path
    assert "python -m team_chat.token NAME" in (target / "team_chat" / "token.py").read_text()


def test_new_refuses_a_full_directory_and_bad_names(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="is not empty"):
        main(["new", str(tmp_path / "full")])
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match="use --package"):
        main(["new", str(tmp_path / "123")])
    with pytest.raises(ValueError, match="not a Python package name"):
        new_app(tmp_path / "x", "class")
    assert package_name(tmp_path / "My-Chat.v2") == "my_chat_v2"
    assert main(["new", str(tmp_path / "123"), "--package", "numbers"]) == 0
    assert (tmp_path / "123" / "numbers" / "app.py").is_file()


def test_the_generated_tests_pass(tmp_path: Path) -> None:
    new_app(tmp_path / "mychat")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path / "mychat",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "5 passed" in done.stdout


@pytest.mark.slow
def test_the_tutorial_from_an_installed_wheel(tmp_path: Path) -> None:
    # The project as a user downloads it: what the wheel is built from.
    source = tmp_path / "chatcore-source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "chatcore", source / "chatcore", ignore=shutil.ignore_patterns("__pycache__")
    )
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    run([*pip, "wheel", "--no-deps", "-w", str(tmp_path / "dist"), str(source)], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("chatcore-*.whl")

    # A fresh environment; chatcore comes from the wheel only. Its dependencies
    # (trio, pytest, ...) are this environment's, added after its own
    # site-packages (a .pth path entry: the editable checkout is not).
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    python = venv / "bin" / "python"
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path
    )
    Path(site.strip(), "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], tmp_path)
    where = run([str(python), "-c", "import chatcore; print(chatcore.__file__)"], tmp_path)
    assert where.startswith(str(venv)), where

    run([str(venv / "bin" / "chatcore"), "new", "mychat"], tmp_path)
    app = tmp_path / "mychat"
    out = run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider"], app)
    assert "5 passed" in out
    # The browser client is in the wheel too, where ASGIApp serves it from.
    check = "import chatcore.static as s; s.client_types(); print(len(s.client_script()))"
    assert int(run([str(python), "-c", check], app)) > 1000


def run(argv: list[str], cwd: Path) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=240, check=False)
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout

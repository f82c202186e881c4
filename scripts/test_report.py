"""The last lines of ``scripts/test``: what was skipped and why, and the coverage floor.

    python scripts/test_report.py SKIP_REPORT FLOOR

``SKIP_REPORT`` holds one JSON line per skipped test (written by the hook in
``tests/conftest.py``). The coverage floor applies when nothing was skipped,
and always under ``CI=true``, where nothing may be skipped at all: CI
installs every service the tests use. Exits non-zero when the run must fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

#: What to install for the tests a reason names (Debian package names).
INSTALL = {"redis-server": "redis-server", "chromium": "chromium", "git": "git"}


def main(argv: list[str]) -> int:
    """Print the skip summary, check the floor; returns the exit status."""
    report, floor = Path(argv[0]), argv[1]
    lines = report.read_text(encoding="utf-8").splitlines() if report.exists() else []
    reasons = Counter(json.loads(line)["reason"] for line in lines if line.strip())
    in_ci = os.environ.get("CI", "").lower() == "true"
    print()
    if reasons:
        print(f"== scripts/test: {sum(reasons.values())} tests skipped:")
        for reason, count in reasons.most_common():
            print(f"  {count:4d}  {reason}")
        if in_ci:
            print("CI=true: every test must run here; install what the reasons name.")
            return 1
        packages = sorted({pkg for word, pkg in INSTALL.items() if any(word in r for r in reasons)})
        print(f"Coverage floor ({floor} %) not checked: skipped tests leave code unmeasured.")
        if packages:
            install = " ".join(packages)
            print(f"For the full run: apt-get install {install}, then scripts/test again.")
        return 0
    total = subprocess.run(
        [sys.executable, "-m", "coverage", "report", "--format=total", f"--fail-under={floor}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if total.returncode != 0:
        print(f"== scripts/test: coverage {total.stdout.strip()} % is below the floor of {floor} %")
        print(total.stderr.strip())
        return 1
    print(f"== scripts/test: nothing skipped; coverage {total.stdout.strip()} % >= {floor} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

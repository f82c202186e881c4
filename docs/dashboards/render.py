"""Draw docs/images/dashboard.png: the dashboard's panels with data from a real run.

Grafana is not needed: this starts redis-server, ``chatcore serve --redis-url``
and Prometheus on 127.0.0.1, runs the tests' scripted session (readers, a
publisher, churn, refused handshakes, one slow consumer), asks Prometheus'
``query_range`` API for every target of ``chatcore.json``, draws each panel
as an SVG chart in one HTML page and screenshots it with headless Chromium.

    .venv/bin/python docs/dashboards/render.py [--seconds 90]
"""

from __future__ import annotations

import argparse
import html
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from prometheus_server import dashboard_session, run_prometheus  # noqa: E402
from redis_server import RedisServer, redis_executable  # noqa: E402
from test_serve_cli import chatcore_serve  # noqa: E402

DASHBOARD = ROOT / "docs" / "dashboards" / "chatcore.json"
OUTPUT = ROOT / "docs" / "images" / "dashboard.png"
COLOURS = ("#3274d9", "#e0752d", "#56a64b", "#c4162a", "#8f3bb8", "#f2cc0c")


def _label(legend: str, metric: dict[str, str]) -> str:
    for key, value in metric.items():
        legend = legend.replace("{{" + key + "}}", value)
    return legend


def _format(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.3g} ms"
    if unit == "bytes":
        if value >= 1024 * 1024:
            return f"{value / (1024 * 1024):.3g} MiB"
        return f"{value / 1024:.3g} KiB"
    if unit == "percentunit":
        return f"{value * 100:.3g} %"
    return f"{value:.4g}"


def svg_panel(title: str, unit: str, series: list[tuple[str, list[tuple[float, float]]]]) -> str:
    """One panel: title, axes, one polyline per series, a legend with last values."""
    width, height, left, top, bottom = 460, 230, 60, 30, 50
    points = [p for _, values in series for p in values if math.isfinite(p[1])]
    if not points:
        body = '<text x="230" y="120" text-anchor="middle" fill="#888">no data</text>'
    else:
        t0, t1 = min(p[0] for p in points), max(p[0] for p in points)
        high = max(p[1] for p in points) or 1.0
        span = (t1 - t0) or 1.0
        inner_w, inner_h = width - left - 10, height - top - bottom
        body = ""
        for fraction in (0.0, 0.5, 1.0):
            y = top + inner_h * (1 - fraction)
            body += (
                f'<line x1="{left}" y1="{y:.1f}" x2="{width - 10}" y2="{y:.1f}" stroke="#333"/>'
                f'<text x="{left - 4}" y="{y + 4:.1f}" text-anchor="end" fill="#aaa" '
                f'font-size="10">{html.escape(_format(high * fraction, unit))}</text>'
            )
        body += (
            f'<text x="{left}" y="{top + inner_h + 14}" fill="#aaa" font-size="10">'
            f"{time.strftime('%H:%M:%S', time.gmtime(t0))}</text>"
            f'<text x="{width - 10}" y="{top + inner_h + 14}" text-anchor="end" fill="#aaa" '
            f'font-size="10">{time.strftime("%H:%M:%S", time.gmtime(t1))} UTC</text>'
        )
        for index, (name, values) in enumerate(series):
            colour = COLOURS[index % len(COLOURS)]
            line = " ".join(
                f"{left + inner_w * (t - t0) / span:.1f},{top + inner_h * (1 - v / high):.1f}"
                for t, v in values
                if math.isfinite(v)
            )
            body += f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{line}"/>'
            last = next((v for _, v in reversed(values) if math.isfinite(v)), float("nan"))
            body += (
                f'<rect x="{left + (index % 2) * 200}" y="{height - 28 + (index // 2) * 12}" '
                f'width="8" height="8" fill="{colour}"/>'
                f'<text x="{left + 12 + (index % 2) * 200}" y="{height - 20 + (index // 2) * 12}" '
                f'fill="#ddd" font-size="10">{html.escape(name)}: '
                f"{html.escape(_format(last, unit))}</text>"
            )
    return (
        f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" '
        f'style="background:#181b1f;border:1px solid #2c3235;margin:4px">'
        f'<text x="8" y="18" fill="#eee" font-size="13" font-weight="bold">'
        f"{html.escape(title)}</text>{body}</svg>"
    )


async def collect(seconds: float, workdir: Path) -> list[str]:
    """Run the session and query every panel; the panels as SVG."""
    dashboard = json.loads(DASHBOARD.read_text())
    (workdir / "redis").mkdir()
    redis = RedisServer(redis_executable(), workdir / "redis")
    redis.start_sync()
    try:
        async with (
            chatcore_serve(
                "tests._serve_targets:small_outbox_hub",
                "--redis-url",
                redis.url,
                "--tcp-user-timeout",
                "2",
                "--no-access-log",
                tmp_path=workdir,
            ) as server,
            run_prometheus([f"127.0.0.1:{server.port}"], workdir) as prometheus,
        ):
            start = time.time()
            await dashboard_session(server.port, seconds)
            await trio.sleep(3)
            end = time.time()
            panels = []
            for panel in dashboard["panels"]:
                series = []
                for target in panel["targets"]:
                    data = await prometheus.api(
                        "query_range",
                        query=target["expr"],
                        start=str(start),
                        end=str(end),
                        step="1",
                    )
                    for result in data["result"]:
                        name = _label(target.get("legendFormat", ""), result["metric"])
                        values = [(float(t), float(v)) for t, v in result["values"]]
                        series.append((name, values))
                unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "")
                panels.append(svg_panel(panel["title"], unit, series))
            return panels
    finally:
        redis.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=90.0)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("render.py needs chromium (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as directory:
        workdir = Path(directory)
        panels = trio.run(collect, args.seconds, workdir)
        page = workdir / "dashboard.html"
        page.write_text(
            "<!doctype html><html><body style='margin:0;background:#111217;"
            "font-family:sans-serif;width:1416px'>"
            "<div style='color:#ddd;padding:6px 8px;font-size:15px'>chatcore: "
            f"{args.seconds:.0f} s scripted session, data from Prometheus query_range</div>"
            + "".join(panels)
            + "</body></html>"
        )
        OUTPUT.parent.mkdir(parents=True, exist_ok=True)
        rows = math.ceil(len(panels) / 3)  # three 240 px panels to a row, as in chatcore.json
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--screenshot={OUTPUT}",
                f"--window-size=1416,{40 + 240 * rows}",
                page.as_uri(),
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

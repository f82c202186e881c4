"""The ``chatcore`` command line (also ``python -m chatcore``).

``chatcore serve MODULE:ATTR`` is the production entry point: it serves a
:class:`~chatcore.Hub`, an :class:`~chatcore.asgi.ASGIApp` or any
:class:`~chatcore.ConnectionHandler` on hypercorn's trio worker, and owns
SIGTERM (drain, then stop). See ``docs/deploy.md``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import attrs

from . import __version__, _logs, _serve
from ._backplane import Backplane, LocalBackplane
from ._connection import ConnectionHandler
from .asgi import ASGIApp
from .metrics import missing_reason as metrics_missing_reason

logger = logging.getLogger("chatcore.cli")

#: ``chatcore serve``'s default for permessage-deflate (see docs/deploy.md).
DEFAULT_COMPRESSION = False


def load_target(spec: str) -> object:
    """Import ``"package.module:attribute"`` (the current directory is importable).

    Raises:
        SystemExit: with a clear message if the module or attribute is missing.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"chatcore: expected MODULE:ATTRIBUTE, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"chatcore: cannot import {module_name!r}: {exc}") from None
    try:
        target: object = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise SystemExit(f"chatcore: {module_name!r} has no attribute {attr!r}") from None
    return target


def _parse_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--bind takes HOST:PORT, got {bind!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chatcore`` command."""
    parser = argparse.ArgumentParser(
        prog="chatcore", description="chatcore: race-free chat and WebSocket servers on Trio."
    )
    parser.add_argument("--version", action="version", version=f"chatcore {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    new = sub.add_parser(
        "new",
        help="write a small chat app, its page and its tests into DIR",
        description="Write a chat app (rooms, typing, a streaming bot, presence, a web page) "
        "and its tests into DIR, as a package named after DIR (or --package).",
    )
    new.add_argument("directory", metavar="DIR", help="where to write (must be empty or new)")
    new.add_argument("--package", help="the app's package name (default: from DIR)")
    serve = sub.add_parser(
        "serve",
        help="serve a hub, ASGIApp or ConnectionHandler on hypercorn",
        description="Serve MODULE:ATTR (a chatcore Hub, ASGIApp or ConnectionHandler) on "
        "hypercorn's trio worker. SIGTERM/SIGINT: refuse new connections (503), drain "
        "within --drain-grace, then stop; a second signal stops at once.",
    )
    serve.add_argument("target", help="MODULE:ATTRIBUTE, e.g. examples.echo:handler")
    serve.add_argument(
        "--bind",
        type=_parse_bind,
        action="append",
        metavar="HOST:PORT",
        help="address to listen on; repeatable (default 127.0.0.1:8000; port 0 picks one)",
    )
    serve.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="worker processes sharing the port (default 1; with the in-process "
        "backplane each worker is its own island)",
    )
    serve.add_argument("--path", help="WebSocket endpoint (default /ws)")
    serve.add_argument("--health-path", help="health/readiness endpoint (default /healthz)")
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        metavar="SECONDS",
        help="seconds between server pings (default: the app's config, 25)",
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds a client has to answer a ping (default: the app's config, 20)",
    )
    serve.add_argument(
        "--redis-url",
        metavar="URL",
        help="run rooms across processes and nodes on Redis (sets CHATCORE_REDIS_URL, which "
        "a Hub without an explicit backplane reads; needs the chatcore[redis] extra)",
    )
    serve.add_argument(
        "--unready-when-degraded",
        action="store_true",
        help="answer the health check with 503 while the backplane (Redis) is unreachable",
    )
    serve.add_argument(
        "--drain-grace",
        type=_seconds,
        default=_serve.DEFAULT_DRAIN_GRACE,
        metavar="SECONDS",
        help="seconds the SIGTERM drain may take (default %(default)s; keep it below "
        "the platform's kill deadline, 10 s on Cloud Run and Kubernetes)",
    )
    serve.add_argument(
        "--tcp-user-timeout",
        type=_seconds,
        default=_serve.DEFAULT_TCP_USER_TIMEOUT,
        metavar="SECONDS",
        help="drop a connection whose sent data stays unacknowledged this long "
        "(bounds sends to stalled clients; default %(default)s, 0 = kernel default)",
    )
    serve.add_argument(
        "--compression",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_COMPRESSION,
        help="accept permessage-deflate when a client offers it (default: off; see "
        "docs/deploy.md for the measurements)",
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log every request and handshake (default: on)",
    )
    serve.add_argument(
        "--gc-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="freeze start-up objects and raise GC thresholds once listening (default: on; "
        "see docs/performance.md)",
    )
    serve.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    serve.add_argument(
        "--log-format",
        choices=_logs.LOG_FORMATS,
        default="text",
        help="log lines as plain text or one JSON object each (default text; "
        "see docs/observability.md)",
    )
    serve.add_argument(
        "--metrics-path",
        metavar="PATH",
        help="where Prometheus metrics are served on the server's port (default /metrics; "
        "'none' to switch off; needs the chatcore[metrics] extra; off there with --workers)",
    )
    serve.add_argument(
        "--metrics-bind",
        type=_parse_bind,
        metavar="HOST:PORT",
        help="also serve metrics on their own port; worker N of --workers uses PORT+N "
        "(port 0: each picks one and logs it)",
    )
    serve.add_argument("--worker-fd", type=int, help=argparse.SUPPRESS)
    return parser


def build_app(
    target: object,
    *,
    path: str | None = None,
    health_path: str | None = None,
    heartbeat_interval: float | None = None,
    heartbeat_timeout: float | None = None,
) -> ASGIApp:
    """The :class:`ASGIApp` ``chatcore serve`` runs for ``target``.

    A hub or any :class:`ConnectionHandler` is wrapped; an :class:`ASGIApp`
    is used as is. The other arguments, when given, override its settings.

    Raises:
        SystemExit: ``target`` is none of those, or a value is invalid.
    """
    try:
        if isinstance(target, ASGIApp):
            app = target
            if path is not None:
                app.path = path
            if health_path is not None:
                app.health_path = health_path
        elif isinstance(target, ConnectionHandler):
            app = ASGIApp(target, path=path or "/ws", health_path=health_path or "/healthz")
        elif isinstance(target, type) and issubclass(target, ConnectionHandler | ASGIApp):
            raise SystemExit(
                f"chatcore: {target.__name__} is a class; serve an instance of it: "
                f"add `handler = {target.__name__}()` to its module and serve MODULE:handler"
            )
        else:
            raise SystemExit(
                f"chatcore: {target!r} is not a chatcore Hub, ASGIApp or ConnectionHandler"
            )
        if heartbeat_interval is not None or heartbeat_timeout is not None:
            base = app.config
            app.config = attrs.evolve(
                base,
                heartbeat_interval=(
                    base.heartbeat_interval if heartbeat_interval is None else heartbeat_interval
                ),
                heartbeat_timeout=(
                    base.heartbeat_timeout if heartbeat_timeout is None else heartbeat_timeout
                ),
            )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"chatcore: {exc}") from None
    return app


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """The command line of one worker process (the same options, one worker)."""
    argv = [sys.executable, "-m", "chatcore", "serve", args.target]
    for option in ("path", "health_path", "heartbeat_interval", "heartbeat_timeout"):
        value = getattr(args, option)
        if value is not None:
            argv += [f"--{option.replace('_', '-')}", str(value)]
    argv += [
        "--drain-grace",
        str(args.drain_grace),
        "--tcp-user-timeout",
        str(args.tcp_user_timeout),
        "--compression" if args.compression else "--no-compression",
        "--access-log" if args.access_log else "--no-access-log",
        "--gc-tuning" if args.gc_tuning else "--no-gc-tuning",
        *(["--unready-when-degraded"] if args.unready_when_degraded else []),
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
        "--metrics-path",
        "none" if args.workers > 1 else (args.metrics_path or "/metrics"),
    ]
    if args.metrics_bind is not None:
        host, port = args.metrics_bind
        argv += ["--metrics-bind", f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    return argv


def _new_command(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ._scaffold import new_app, package_name

    directory = Path(args.directory)
    try:
        package = args.package or package_name(directory)
        new_app(directory, package)
    except (ValueError, FileExistsError) as exc:
        raise SystemExit(f"chatcore new: {exc}") from None
    print(
        f"Wrote a chat app to {directory}/. Next:\n"
        f"  cd {directory}\n"
        f"  chatcore serve {package}.app:app      # then open http://127.0.0.1:8000/\n"
        f"  pip install 'chatcore[testing]' && python -m pytest"
    )
    return 0


def _redis_extra_missing() -> str | None:
    """Why ``--redis-url`` cannot work here (the extra is not installed), or None."""
    try:
        import coredis  # noqa: F401
    except ImportError as exc:
        return f"--redis-url needs the Redis extra ({exc}): pip install 'chatcore[redis]'"
    return None


def _metrics_socket(args: argparse.Namespace) -> socket.socket | None:
    """The socket of ``--metrics-bind`` (worker N: port + N), or None."""
    if args.metrics_bind is None:
        return None
    if (missing := metrics_missing_reason()) is not None:
        raise SystemExit(f"chatcore: --metrics-bind needs the metrics extra: {missing}")
    host, port = args.metrics_bind
    if port:
        port += int(os.environ.get("CHATCORE_WORKER_INDEX", "0"))
    try:
        return _serve.create_listening_socket(host, port, tcp_user_timeout=None)
    except OSError as exc:
        raise SystemExit(f"chatcore: cannot listen for metrics on {host}:{port}: {exc}") from None


def _serve_command(args: argparse.Namespace) -> int:
    if args.worker_fd is None:
        # Importing the target can take a while; a SIGTERM meanwhile (a deploy
        # that changes its mind) waits, blocked, until the server can drain
        # (see Server._watch_signals and run_workers) instead of killing it.
        # Workers inherit the block from the supervisor.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    if args.worker_fd is not None:
        # Lets an app tell its workers from the server (e.g. to log a notice once).
        os.environ["CHATCORE_WORKER"] = "1"
    if args.redis_url and (missing := _redis_extra_missing()):
        raise SystemExit(f"chatcore: {missing}")
    if args.redis_url:
        # Before the target is imported: its Hub picks its backplane from this.
        # Worker processes inherit it.
        os.environ["CHATCORE_REDIS_URL"] = args.redis_url
    app = build_app(
        load_target(args.target),
        path=args.path,
        health_path=args.health_path,
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_timeout=args.heartbeat_timeout,
    )
    if args.unready_when_degraded:
        app.unready_when_degraded = True
    if args.metrics_path is not None:
        app.metrics_path = None if args.metrics_path.lower() == "none" else args.metrics_path
    try:
        _serve.set_compression(args.compression, max_message_bytes=app.config.max_message_bytes)
    except RuntimeError as exc:
        raise SystemExit(f"chatcore: {exc}") from None
    if args.worker_fd is not None:
        sock = _serve.worker_socket(args.worker_fd)
        return _serve.run_until_shutdown(
            app,
            [sock],
            drain_grace=args.drain_grace,
            access_log=args.access_log,
            worker=True,
            gc_tuning=args.gc_tuning,
            metrics_socket=_metrics_socket(args),
        )
    binds = args.bind or [("127.0.0.1", 8000)]
    if args.workers > 1 and len(binds) > 1:
        raise SystemExit("chatcore: --workers takes a single --bind")
    try:
        sockets = [
            _serve.create_listening_socket(host, port, tcp_user_timeout=args.tcp_user_timeout)
            for host, port in binds
        ]
    except OSError as exc:
        raise SystemExit(f"chatcore: cannot listen: {exc}") from None
    logger.info(
        "%s on %s: compression %s, drain grace %.1f s, TCP_USER_TIMEOUT %s",
        type(app.handler).__name__,
        "hypercorn (trio worker)",
        "on" if args.compression else "off",
        args.drain_grace,
        f"{args.tcp_user_timeout:g} s" if args.tcp_user_timeout else "kernel default",
    )
    if args.workers == 1:
        return _serve.run_until_shutdown(
            app,
            sockets,
            drain_grace=args.drain_grace,
            access_log=args.access_log,
            gc_tuning=args.gc_tuning,
            metrics_socket=_metrics_socket(args),
        )
    # A handler with a shared backplane (a hub on Redis) spans the workers.
    backplane = getattr(app.handler, "backplane", None)
    if isinstance(backplane, Backplane) and not isinstance(backplane, LocalBackplane):
        logger.info(
            "%d worker processes share the port; rooms span them through %s",
            args.workers,
            type(backplane).__name__,
        )
    else:
        logger.warning(
            "%d worker processes share the port; with the in-process backplane each worker "
            "is its own island (members of one room on different workers do not see each "
            "other's messages)",
            args.workers,
        )
    if args.metrics_bind is None and app.metrics_path is not None:
        logger.warning(
            "with --workers, metrics are not served on the shared port (a scrape would "
            "reach one worker at random); use --metrics-bind HOST:PORT (worker N on PORT+N)"
        )
    for url in (_serve.websocket_url(sock, app.path) for sock in sockets):
        print(f"chatcore: serving on {url}", flush=True)
    return _serve.run_workers(_worker_argv(args), sockets[0], args.workers)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chatcore`` console script.

    Returns:
        The process exit code (0 after a graceful shutdown).

    Raises:
        SystemExit: bad arguments or an unusable target (with a message).
    """
    args = build_parser().parse_args(argv)
    try:
        _logs.configure_logging(
            getattr(args, "log_level", "INFO"), getattr(args, "log_format", "text")
        )
    except ValueError as exc:
        raise SystemExit(f"chatcore: {exc}") from None
    if args.command == "serve":
        return _serve_command(args)
    if args.command == "new":
        return _new_command(args)
    raise SystemExit(f"chatcore: unknown command {args.command!r}")  # pragma: no cover

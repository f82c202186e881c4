"""The ``chatcore`` command line."""

from __future__ import annotations

import argparse
import functools
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

import trio

from ._config import Config
from ._connection import ConnectionHandler

logger = logging.getLogger("chatcore.cli")


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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``chatcore`` command."""
    parser = argparse.ArgumentParser(prog="chatcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve a ConnectionHandler over WebSocket")
    serve.add_argument("target", help="MODULE:ATTRIBUTE of the handler, e.g. examples.echo:handler")
    serve.add_argument(
        "--bind", type=_parse_bind, default=("127.0.0.1", 8000), help="HOST:PORT (127.0.0.1:8000)"
    )
    serve.add_argument(
        "--heartbeat-interval",
        type=float,
        default=Config().heartbeat_interval,
        help="seconds between server pings",
    )
    serve.add_argument(
        "--heartbeat-timeout",
        type=float,
        default=Config().heartbeat_timeout,
        help="seconds a client has to answer a ping",
    )
    serve.add_argument("--log-level", default="INFO", help="logging level (INFO)")
    return parser


async def _serve(handler: ConnectionHandler, host: str, port: int, config: Config) -> None:
    from .transports._trio_websocket import serve_websocket

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(serve_websocket, handler, host, port, config=config)
        )
        for listener in listeners:
            address = listener.socket.getsockname()
            print(f"chatcore: serving on ws://{address[0]}:{address[1]}/", flush=True)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                logger.info(
                    "received %s; closing connections with 1012", signal.Signals(signum).name
                )
                nursery.cancel_scope.cancel()
                break


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``chatcore`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    handler = load_target(args.target)
    if not isinstance(handler, ConnectionHandler):
        raise SystemExit(f"chatcore: {args.target} is not a chatcore.ConnectionHandler")
    try:
        config = Config(
            heartbeat_interval=args.heartbeat_interval, heartbeat_timeout=args.heartbeat_timeout
        )
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"chatcore: {exc}") from None
    host, port = args.bind
    trio.run(_serve, handler, host, port, config)
    return 0

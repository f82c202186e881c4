"""Running an :class:`~chatcore.asgi.ASGIApp` on hypercorn: the ``chatcore serve`` runtime.

Theory of operation
-------------------

``chatcore serve`` runs hypercorn's trio worker programmatically
(:func:`hypercorn.trio.serve`) and owns what hypercorn gets wrong for
long-lived WebSockets:

* **The listening sockets.** :func:`create_listening_socket` makes them with
  ``SO_REUSEADDR`` and ``TCP_USER_TIMEOUT``; hypercorn receives them as
  ``fd://N`` binds. hypercorn shields its socket writes from cancellation, so
  a send to a client that stopped reading can only be ended by the kernel:
  ``TCP_USER_TIMEOUT`` drops a connection whose data stays unacknowledged
  that long (accepted sockets inherit the option). Without it a client that
  is alive but stopped reading blocks its connection's send, and graceful
  shutdown, indefinitely (the kernel keeps probing the zero window), and a
  client that vanished mid-send for the ~15 minutes of ``tcp_retries2``.

* **Shutdown.** On SIGTERM/SIGINT hypercorn would say nothing to the
  application for ``graceful_timeout`` and then cancel it (clients see 1006;
  ASGI ``lifespan.shutdown`` only arrives after the connections are gone). So
  :func:`serve` takes the signals itself and:

  1. stops admitting: new handshakes get 503 with ``Retry-After`` and
     ``/healthz`` turns 503 (not ready);
  2. drains: :meth:`ASGIApp.drain` (for a hub: ``shutdown`` messages with a
     jittered ``reconnect_after_ms``, then 1012 closes in batches) within
     ``drain_grace`` seconds;
  3. then triggers hypercorn's own shutdown, which gets :data:`SHUTDOWN_GRACE`
     seconds for HTTP requests in flight before it cancels what is left:
     each connection still open closes with 1012 (its actor's shielded,
     bounded close) and is dropped.

  A second signal skips the waiting: the drain stops and hypercorn cancels
  everything at once (still with a 1012 close frame per connection).

* **Workers.** With ``workers > 1`` the parent process creates the listening
  socket and starts that many worker processes that inherit it
  (``python -m chatcore serve ... --worker-fd N``); the kernel spreads the
  accepted connections. The parent forwards SIGTERM/SIGINT to the workers
  and exits when they have. With the in-process backplane each worker is its
  own island: the rooms of one worker do not see another's members.

* **Compression.** hypercorn 0.18 accepts permessage-deflate whenever the
  client offers it (every browser does) and has no setting for it
  (pgjones/hypercorn#307). See :func:`set_compression` and ``docs/deploy.md``
  for the measurements behind ``chatcore serve``'s default.

* **Closed connections.** hypercorn's per-connection server and its protocol
  refer to each other, and so does wsproto's frame parser with itself, so a
  closed connection used to wait for a full garbage collection.
  :mod:`chatcore._hypercorn_tcp` cuts the first cycle when the connection
  ends and :mod:`chatcore._frame_parser` the second, so reference counting
  frees a closed connection at once (see ``docs/performance.md``,
  "Connection churn").

* **The wire.** hypercorn inflates compressed messages before checking their
  size and drops TCP without a close frame on a WebSocket protocol error;
  :mod:`chatcore._wire_guard` bounds the one and answers the other (1002,
  1007, 1009), and ``docs/security.md`` lists what a client sees.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Sequence
from typing import Any, cast

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from ._hypercorn_tcp import release_closed_connections
from ._logs import AccessLog
from ._server import _ServerControl
from ._wire_guard import answer_protocol_errors, install_deflate
from .asgi import ASGIApp

__all__ = [
    "DEFAULT_DRAIN_GRACE",
    "DEFAULT_TCP_USER_TIMEOUT",
    "SHUTDOWN_GRACE",
    "Server",
    "create_listening_socket",
    "hypercorn_config",
    "run_workers",
    "serve",
    "set_compression",
]

logger = logging.getLogger("chatcore.serve")

#: Seconds a SIGTERM drain may take (Cloud Run and Kubernetes kill after 10).
DEFAULT_DRAIN_GRACE = 8.0
#: Seconds unacknowledged data may stay in flight before the kernel drops the
#: connection (``TCP_USER_TIMEOUT``): the bound on a send to a stalled client.
DEFAULT_TCP_USER_TIMEOUT = 10.0
#: Seconds hypercorn gets, after the drain, to finish HTTP requests in flight
#: before it cancels what is left.
SHUTDOWN_GRACE = 1.0


def create_listening_socket(
    host: str,
    port: int,
    *,
    tcp_user_timeout: float | None = DEFAULT_TCP_USER_TIMEOUT,
    reuse_port: bool = False,
    backlog: int = 1024,
) -> socket.socket:
    """A listening TCP socket for hypercorn, with the options chatcore relies on.

    ``SO_REUSEADDR`` (restart without waiting for TIME_WAIT) and
    ``TCP_USER_TIMEOUT`` (see the module docs), which every accepted socket
    inherits. The socket is inheritable, so worker processes can share it.

    Args:
        host: Address to bind (``"127.0.0.1"``, ``"0.0.0.0"``, ``"::"``...).
        port: Port to bind; 0 picks a free one (read it with ``getsockname()``).
        tcp_user_timeout: Seconds, or ``None``/0 to leave the kernel default.
            Ignored (with a warning) where the platform lacks the option.
        reuse_port: Also set ``SO_REUSEPORT`` (several processes binding the
            same port themselves).
        backlog: The listen backlog.

    Raises:
        OSError: the address cannot be bound.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if tcp_user_timeout:
            option = getattr(socket, "TCP_USER_TIMEOUT", None)
            if option is None:
                logger.warning(
                    "TCP_USER_TIMEOUT is not available here; stalled sends are unbounded"
                )
            else:
                sock.setsockopt(socket.IPPROTO_TCP, option, max(1, round(tcp_user_timeout * 1000)))
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def set_compression(enabled: bool, *, max_message_bytes: int = 65_536) -> None:
    """Whether hypercorn accepts permessage-deflate in this process.

    hypercorn 0.18 has no setting for it: ``WSStream`` accepts wsproto's
    ``PerMessageDeflate`` whenever the client offers it
    (``hypercorn/protocol/ws_stream.py``; pgjones/hypercorn#307). This rebinds
    that one module-level name, process-wide: enabled, to an extension that
    inflates a message only up to ``max_message_bytes`` and answers more with
    1009 (a compression bomb costs no memory); disabled, to one that declines
    the offer. It refuses to guess if that name ever changes (see
    :mod:`chatcore._wire_guard`). ``chatcore serve`` calls it once at start-up.

    Args:
        enabled: Accept compression when a client offers it.
        max_message_bytes: Most bytes one compressed message may inflate to
            (``chatcore serve`` passes the app's ``Config.max_message_bytes``).

    Raises:
        RuntimeError: this hypercorn does not negotiate compression the way
            0.18 does, so it cannot be bounded or switched off here.
    """
    try:
        install_deflate(enabled, max_message_bytes)
    except RuntimeError:
        if enabled:
            raise RuntimeError(
                "cannot bound permessage-deflate for this hypercorn version; "
                "run with compression disabled"
            ) from None
        raise RuntimeError(
            "cannot switch off permessage-deflate for this hypercorn version; "
            "run with compression enabled"
        ) from None


def hypercorn_config(app: ASGIApp, *, access_log: bool = True) -> HypercornConfig:
    """The hypercorn configuration ``chatcore serve`` uses (without binds).

    Logs go through :mod:`logging`: requests to ``chatcore.access``, one
    escaped line each (:class:`chatcore._logs.AccessLog`), errors to
    ``hypercorn.error``.
    hypercorn's own per-message limit is set to twice chatcore's, so chatcore
    itself answers oversize messages with 1009 and records why; only a
    message beyond that is cut off by hypercorn (also with 1009). hypercorn
    buffers at most ``Config.handshake_limits.max_head_bytes`` of a request
    head that is still incomplete (more gets 431).
    """
    config = HypercornConfig()
    config.accesslog = logging.getLogger("hypercorn.access") if access_log else None
    # chatcore's access log: one escaped line per request (chatcore._logs).
    config.logger_class = AccessLog
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = SHUTDOWN_GRACE
    config.websocket_max_message_size = 2 * app.config.max_message_bytes
    config.h11_max_incomplete_size = app.config.handshake_limits.max_head_bytes
    return config


def websocket_url(sock: socket.socket, path: str) -> str:
    """The ``ws://host:port/path`` URL a listening socket serves."""
    host, port = sock.getsockname()[:2]
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}{path}"


@attrs.define(eq=False)
class Server(_ServerControl):
    """A running :func:`serve` (its ``task_status`` value).

    Attributes:
        app: The application being served.
        urls: The WebSocket URLs served (one per listening socket).
    """

    app: ASGIApp
    urls: tuple[str, ...]
    _config: HypercornConfig = attrs.field(alias="config")
    # hypercorn's task (a second request during its grace period cancels it).
    _hypercorn_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope, init=False)
    # hypercorn's shutdown trigger.
    _stop_hypercorn: trio.Event = attrs.field(factory=trio.Event, init=False)

    def _skip_waiting(self) -> None:
        # hypercorn gets no grace; if it is already stopping, it is cancelled.
        self._config.graceful_timeout = 0
        if self._stop_hypercorn.is_set():
            self._hypercorn_scope.cancel()
        self._stop_hypercorn.set()


async def serve(
    app: ASGIApp,
    sockets: Sequence[socket.socket],
    *,
    drain_grace: float = DEFAULT_DRAIN_GRACE,
    access_log: bool = True,
    config: HypercornConfig | None = None,
    signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT),
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker until shut down, then drain.

    Returns after a graceful shutdown (see the module docs): a signal in
    ``signals`` or :meth:`Server.request_shutdown`. The sockets stay open
    (the caller made them; hypercorn serves duplicates of them).

    Args:
        app: The application.
        sockets: Listening sockets (see :func:`create_listening_socket`).
        drain_grace: Seconds the drain may take after the shutdown request.
        access_log: Log every request (handshakes included) to ``hypercorn.access``.
        config: hypercorn's configuration (default :func:`hypercorn_config`);
            its binds are replaced by ``sockets``.
        signals: Signals that request the shutdown (only in the main thread;
            pass ``()`` to handle shutdown yourself).
        task_status: Started with the :class:`Server` once listening.

    Raises:
        Exception: whatever makes hypercorn itself fail (e.g. a bad socket).

    Cancellation: hypercorn stops at once; each open connection still gets
    a 1012 close frame.
    """
    config = config or hypercorn_config(app, access_log=access_log)
    answer_protocol_errors(True)  # close frames for protocol errors (chatcore._wire_guard)
    _release_closed_connections()
    duplicates = [os.dup(sock.fileno()) for sock in sockets]
    config.bind = [f"fd://{fd}" for fd in duplicates]
    server = Server(app, tuple(websocket_url(sock, app.path) for sock in sockets), config=config)
    try:
        async with trio.open_nursery() as nursery:

            async def run_hypercorn(*, task_status: trio.TaskStatus[list[str]]) -> None:
                with server._hypercorn_scope:
                    await hypercorn_serve(
                        cast(Any, app),
                        config,
                        shutdown_trigger=server._stop_hypercorn.wait,
                        task_status=task_status,
                    )
                nursery.cancel_scope.cancel()  # hypercorn is done: so are we

            if signals:
                nursery.start_soon(server._watch_signals, signals)
            await nursery.start(run_hypercorn)
            duplicates.clear()  # hypercorn owns them now
            task_status.started(server)
            await server._drain(app, drain_grace)
            server._stop_hypercorn.set()
            await trio.sleep_forever()
    finally:
        for fd in duplicates:
            os.close(fd)


def _release_closed_connections() -> None:
    """Free closed connections at once (:mod:`chatcore._hypercorn_tcp`), or say why not."""
    try:
        release_closed_connections(True)
    except RuntimeError as exc:
        # Serving still works: closed connections wait for a full collection.
        logger.warning("%s; closed connections are freed by the garbage collector", exc)


def run_workers(argv: Sequence[str], sock: socket.socket, workers: int) -> int:
    """Run ``workers`` worker processes sharing ``sock``: the supervisor of ``--workers N``.

    Each worker runs ``argv`` plus ``--worker-fd N`` (the inherited socket).
    SIGTERM and SIGINT here are forwarded to the workers as SIGTERM (a second
    one too, so they skip their waiting). A worker starts with SIGINT ignored
    (the terminal's Ctrl-C reaches the whole process group; the supervisor
    decides) and SIGTERM blocked until it can drain (see
    :meth:`Server._watch_signals`), so a SIGTERM that arrives while it is still
    starting is not fatal but handled once it is up. If a worker exits on its
    own, the others are stopped too.

    Args:
        argv: The worker command line, without ``--worker-fd``.
        sock: The shared listening socket.
        workers: How many worker processes.

    Returns:
        0 if every worker exited with 0, else the first non-zero exit code.
    """
    fd = sock.fileno()
    early: list[int] = []  # signals that arrive before the trio loop runs
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: early.append(signum))
    # Dispositions set to "ignore" and blocked signals survive exec: the
    # workers inherit both (a Python handler would not).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        processes = [
            subprocess.Popen(
                [*argv, "--worker-fd", str(fd)],
                pass_fds=(fd,),
                # Which worker it is (e.g. its metrics port: --metrics-bind).
                env={**os.environ, "CHATCORE_WORKER_INDEX": str(index)},
            )
            for index in range(workers)
        ]
    finally:
        # From here on the supervisor takes SIGTERM (``early`` until its loop
        # runs), even if it arrived blocked from ``chatcore serve``'s start-up.
        signal.pthread_sigmask(signal.SIG_SETMASK, mask - {signal.SIGTERM})
    try:
        return trio.run(_supervise, processes, early)
    finally:
        signal.signal(signal.SIGTERM, previous)


async def _supervise(processes: list[subprocess.Popen[bytes]], early: list[int]) -> int:
    codes: list[int] = []
    stopping = False

    def forward(reason: str) -> None:
        logger.info("%s; stopping the workers", reason)
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    async def watch(process: subprocess.Popen[bytes]) -> None:
        nonlocal stopping
        code = await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
        codes.append(code)
        if not stopping:
            stopping = True
            forward(f"worker {process.pid} exited with {code}")

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as received:
        async with trio.open_nursery() as nursery:

            async def watch_all() -> None:
                async with trio.open_nursery() as watchers:
                    for process in processes:
                        watchers.start_soon(watch, process)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_all)
            for signum in early:
                stopping = True
                forward(f"received {signal.Signals(signum).name}")
            async for signum in received:
                stopping = True
                forward(f"received {signal.Signals(signum).name}")
    return next((code for code in codes if code != 0), 0)


def _ignore_terminal_interrupt() -> None:
    """Worker processes leave SIGINT to the supervisor (see :func:`run_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def worker_socket(fd: int) -> socket.socket:
    """The listening socket a worker inherited as ``fd``.

    Raises:
        SystemExit: ``fd`` is not a listening TCP socket.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise SystemExit(f"chatcore: --worker-fd {fd}: {exc}") from None
    if sock.type != socket.SOCK_STREAM:
        raise SystemExit(f"chatcore: --worker-fd {fd} is not a TCP socket")
    sock.setblocking(False)
    return sock


#: Generation thresholds ``chatcore serve`` sets (``gc.set_threshold``).
GC_THRESHOLDS = (50_000, 20, 100)


def tune_gc() -> None:
    """Freeze start-up objects and raise the collection thresholds (see ``run_until_shutdown``)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_until_shutdown(
    app: ASGIApp,
    sockets: Sequence[socket.socket],
    *,
    drain_grace: float = DEFAULT_DRAIN_GRACE,
    access_log: bool = True,
    worker: bool = False,
    gc_tuning: bool = True,
    engine: str = "hypercorn",
    metrics_socket: socket.socket | None = None,
) -> int:
    """Run :func:`serve` in a fresh trio loop: the body of ``chatcore serve``.

    ``engine="lean"`` runs :func:`chatcore._lean_serve.serve_lean` instead of
    hypercorn (the same shutdown sequence; see ``docs/deploy.md``).

    Prints ``chatcore: serving on ws://…`` per socket once listening (unless
    ``worker``: the supervisor printed it) and takes SIGTERM and SIGINT (a
    worker only SIGTERM, see :func:`run_workers`).

    With ``gc_tuning`` (the default), once listening it moves everything
    allocated at start-up out of the garbage collector's view (``gc.freeze``)
    and raises the first-generation threshold: with thousands of connections
    the collector otherwise takes about half of the server's CPU
    (docs/performance.md).

    With ``metrics_socket``, Prometheus metrics are also served there
    (plain HTTP, see :func:`chatcore.metrics.serve_metrics_listener`).

    Returns:
        0 after a graceful shutdown.
    """
    signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)
    if worker:
        _ignore_terminal_interrupt()
        signals = (signal.SIGTERM,)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            serve_function: Any = serve
            if engine == "lean":
                from ._lean_serve import serve_lean as serve_function
            server: Server = await nursery.start(
                functools.partial(
                    serve_function,
                    app,
                    sockets,
                    drain_grace=drain_grace,
                    access_log=access_log,
                    signals=signals,
                )
            )
            if gc_tuning:
                tune_gc()
            if metrics_socket is not None:
                await nursery.start(_serve_metrics_port, app, metrics_socket, server)
            if worker:
                logger.info("worker %d serving %s", os.getpid(), " ".join(server.urls))
                return
            for url in server.urls:
                print(f"chatcore: serving on {url}", flush=True)
                health = url.replace("ws", "http", 1).removesuffix(app.path) + app.health_path
                logger.info("health and readiness: %s", health)

    trio.run(main)
    return 0


async def _serve_metrics_port(
    app: ASGIApp,
    sock: socket.socket,
    server: Server,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve metrics on ``sock`` until the server shuts down."""
    from .metrics import serve_metrics_listener

    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    host, port = sock.getsockname()[:2]
    logger.info("metrics of process %d: http://%s:%d/metrics", os.getpid(), host, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics_listener, app, listener)
        task_status.started()
        await server._shutdown.wait()
        nursery.cancel_scope.cancel()

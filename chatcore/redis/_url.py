"""Redis URLs: one server or a cluster, and the acknowledgement options they carry.

``redis://`` / ``rediss://`` / ``unix://`` name one server (coredis parses
them). ``redis+cluster://HOST:PORT[,HOST:PORT...]`` and
``rediss+cluster://...`` name a Redis Cluster by one or more seed nodes; the
rest of the cluster is discovered from them. Credentials, TLS options and
the database part apply to every node.

Both kinds accept chatcore's own query options, taken out of the URL before
coredis sees it (so ``CHATCORE_REDIS_URL`` and ``chatcore serve --redis-url``
can set them):

``wait_replicas=N``
    A publish is acknowledged only once N replicas have it (``WAIT``).
``wait_timeout=SECONDS``
    How long a publish waits for them (default 1).
``wait_aof=1``
    Also wait for the append-only file to be fsynced, on the primary and on
    the N replicas (``WAITAOF``, Redis 7.2 or later; on an older server the
    backplane falls back to ``WAIT`` and says so in its log).
"""

from __future__ import annotations

import math
from typing import Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs

__all__ = ["AckOptions", "ClusterURL", "is_cluster_url", "parse_cluster_url", "split_ack_options"]

CLUSTER_SCHEMES: Final = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


@attrs.frozen
class AckOptions:
    """What a publish waits for before its ``ok`` (see the module docs)."""

    #: Replicas that must have the message (0: the primary ran the script).
    replicas: int = 0
    #: Seconds to wait for them.
    timeout: float = 1.0
    #: Also wait for the AOF fsync (``WAITAOF``).
    aof: bool = False


@attrs.frozen
class ClusterURL:
    """A parsed ``redis+cluster://`` URL."""

    #: (host, port) of every seed node, in the URL's order.
    seeds: tuple[tuple[str, int], ...]
    #: ``redis`` or ``rediss``.
    scheme: str
    #: ``user:password@`` or empty.
    userinfo: str
    #: The path and query (``/db?options``) every node URL carries.
    path: str
    query: str

    def node_url(self, host: str, port: int) -> str:
        """The plain URL of one node of the cluster."""
        netloc = (
            f"{self.userinfo}[{host}]:{port}" if ":" in host else f"{self.userinfo}{host}:{port}"
        )
        return urlunsplit((self.scheme, netloc, self.path, self.query, ""))


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def split_ack_options(url: str) -> tuple[str, AckOptions | None]:
    """Take chatcore's acknowledgement options out of ``url``.

    Returns:
        The URL without them, and the options (``None`` if it had none).

    Raises:
        ValueError: an option has a bad value.
    """
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in ("wait_replicas", "wait_timeout", "wait_aof")}
    if not ours:
        return url, None
    rest = urlencode([(k, v) for k, v in pairs if k not in ours])
    try:
        replicas = int(ours.get("wait_replicas", "0"))
        timeout = float(ours.get("wait_timeout", "1"))
    except ValueError as exc:
        raise ValueError(f"bad acknowledgement option in the Redis URL: {exc}") from None
    aof = ours.get("wait_aof", "0").lower() in ("1", "true", "yes")
    if replicas < 0 or not (0 < timeout < math.inf):
        raise ValueError("wait_replicas must be >= 0 and wait_timeout a positive number of seconds")
    return urlunsplit(parts._replace(query=rest)), AckOptions(replicas, timeout, aof)


def parse_cluster_url(url: str) -> ClusterURL:
    """Parse ``redis+cluster://[user:password@]HOST:PORT[,HOST:PORT...][/db][?options]``.

    Raises:
        ValueError: not a cluster URL, no seed, or a seed without a valid port.
    """
    scheme, sep, rest = url.partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower())
    if base is None or not sep:
        raise ValueError(f"not a Redis Cluster URL (redis+cluster://HOST:PORT,...): {url!r}")
    netloc, slash, tail = rest.partition("/")
    path_and_query = slash + tail
    userinfo, at, hosts = netloc.rpartition("@")
    seeds = []
    for item in hosts.split(","):
        host, colon, port = item.strip().rpartition(":")
        host = host.strip("[]")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"a Redis Cluster seed must be HOST:PORT, got {item!r}")
        seeds.append((host, int(port)))
    path, _, query = path_and_query.partition("?")
    return ClusterURL(tuple(seeds), base, userinfo + at, path, query)

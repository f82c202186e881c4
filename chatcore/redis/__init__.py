"""Scale-out on Redis: :class:`RedisBackplane`, the backplane across processes and nodes.

Install the extra: ``pip install 'chatcore[redis]'`` (it pulls in ``coredis``).

The package, by role: ``_scripts`` (the Lua scripts: where order is
decided), ``_records`` (what one session and one room hold, reply parsing),
``_backplane`` (:class:`RedisBackplane`: the calls, the supervised session,
incoming messages), ``_cluster`` (:class:`RedisClusterBackplane`: one such
session per Redis Cluster shard, following the topology), ``_url`` (which
URL means what). Node events use the byte format of
:func:`chatcore.sansio.encode_node_event`.

Theory of operation
-------------------

Rule 1: **a room's order is decided in one place, a Lua script.** For a room
``R`` the script ``_PUBLISH_LUA`` makes sure the room has an epoch (the
caller's fresh random one is stored only if none is), increments the offset,
builds the final ``message`` text by concatenating JSON fragments the node
encoded (so it is byte-identical to :func:`~chatcore.sansio.encode_message`),
appends it to the room's capped stream (entry id ``<offset>-0``) and
``PUBLISH``-es ``offset, epoch, nonce, text`` on the room's channel, all
atomically. Its reply, ``(epoch, offset)``, is the publisher's ``ok``: a
message is reported sequenced only once it is in the stream.

Rule 2: **a node hears a room only on the room's channel.** Every node that
:meth:`~RedisBackplane.watch`-es a room subscribes to its channel and hands
each message to the hub as a :class:`~chatcore.Sequenced` event (through
:meth:`BackplaneSink.backplane_event <chatcore.BackplaneSink.backplane_event>`), the publishing node
included: Redis delivers a channel's messages in execution order, so the
channel is the one ordered path. The publisher's reply and its own message meet
in the hub by ``nonce``.

Rule 3: **the subscription is supervised here, not in coredis.** coredis
6.9's own pub/sub recovery is not trusted (iteration can end silently after a
reconnect, messages published while it resubscribes are lost, a pool slot
leaks per reconnect, its backoff never resets). A *session* is one fresh
coredis client with three connections (subscription, publishing, commands).
The subscription is pinged every ``heartbeat_interval`` and every command has
a reply deadline, so a dead or hung (``SIGSTOP``-ped) server ends the session
within about ``heartbeat_interval + command_timeout``. Then the backplane is
:attr:`~RedisBackplane.degraded`, and reconnects with exponential backoff and
jitter that starts over after a session that held. A new session subscribes
to every watched room *first*, then reads each room's stream from the last
offset it delivered (*catch-up*) before it delivers anything from the
channels, so nothing published during the outage or the resubscribe is lost,
and the hub's sequencer drops what it already has.

Rule 4: **while Redis is away, calls fail fast and nothing lies.** Publishes
wait up to ``request_timeout`` for Redis to come back (a short blip is ridden
out), then raise :class:`~chatcore.BackplaneError` (the hub answers
``unavailable``); once the outage is older than that, at once. A publish whose
script was sent but whose reply never came may or may not have been
sequenced: it is reported as failed, and if it was stored every member still
receives it. Open client connections stay up throughout.

Rule 5: **lost history is a new epoch.** If a room's keys vanish (Redis
restarted without persistence, eviction, the idle TTL), the next script run
creates a new epoch (and drops any leftover stream). A node that sees a
watched room's epoch change sends a :class:`~chatcore.RoomReset` event once per
change; messages of an epoch it has already left behind are dropped. The same
holds when Redis comes back *behind* what a node already delivered (a replica
promoted before it had the newest messages, a restore from an older file): the
node that notices on its catch-up ends the epoch (``ROLLBACK_LUA``), since
the next offsets would otherwise be given to other messages.

Keys and channels
-----------------

Per room, hash-tagged so a room's keys share one Redis Cluster slot::

    {prefix}:{<room>}:meta     hash: e = epoch, o = last offset
    {prefix}:{<room>}:log      stream: id <offset>-0, fields t (ms), m (text)
    {prefix}:{<room>}:ch       channel: "<offset>\\n<epoch>\\n<nonce>\\n<text>", and
                               broadcasts: "b<JSON header>\\n<text>"

Per deployment::

    {prefix}:nodes             zset: node id -> lease expiry (Redis ms)
    {prefix}:bus               channel: directed messages, disconnects, presence

Directed delivery (``send_to_user``, ``disconnect_user``) and presence go over
the one bus channel every node subscribes to: a node keeps no per-user
subscriptions, so there is no subscribe race when a user's tab connects to a
node; each node looks the user up locally. Broadcasts (messages outside a
room's order) go over the room's channel, so only nodes with members hear
them. For all three the sending node delivers to its own connections directly
(also while Redis is down) and ignores its echo. None of these is stored: a
node that is disconnected when one is sent misses it (a hub that has
gets a :class:`~chatcore.Reconnected` event after every reconnect, to
re-announce its presence).

On Redis Cluster (:class:`RedisClusterBackplane`) the room channel is a shard
channel (``SPUBLISH``/``SSUBSCRIBE``), the bus is 16 shard channels spread
over the slots (a user's traffic on its hash's channel, a node's presence on
its own), and each shard gets its own session with the rules above; see
``chatcore.redis._cluster`` for how the topology is followed.

Subscriptions follow :meth:`~RedisBackplane.watch`; after
:meth:`~RedisBackplane.unwatch` a room stays subscribed for
``unsubscribe_linger`` seconds, so the hub's unwatch/watch around a first join,
and members leaving and coming right back, keep the live subscription (and
what this node knows of the room).

Node liveness: every node refreshes its lease in the ``nodes`` zset every
``node_ttl / 3`` seconds with a script that also reaps expired leases (Redis
clock). A node that disappears from the zset (and whose last lease expired) is
reported once as a :class:`~chatcore.NodeDown` event. After a reconnect, no
node is reported down for one ``node_ttl``, so peers that are re-registering
after a Redis restart are not mistaken for dead ones.
"""

from __future__ import annotations

try:
    import coredis
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "chatcore.redis needs the coredis package: pip install 'chatcore[redis]'"
    ) from exc

from ._backplane import RedisBackplane as RedisBackplane
from ._cluster import RedisClusterBackplane as RedisClusterBackplane
from ._records import RedisBackplaneStatistics as RedisBackplaneStatistics
from ._records import ShardStatistics as ShardStatistics

__all__ = [
    "RedisBackplane",
    "RedisBackplaneStatistics",
    "RedisClusterBackplane",
    "ShardStatistics",
]

del coredis

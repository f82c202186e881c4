"""User-level presence with a grace window, across nodes (plain synchronous tests)."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatcore.sansio import LocalProtocolError
from chatcore.sansio._presence import PresenceDiff, PresenceMeta, PresenceTable

GRACE = 10.0


def table(grace: float = GRACE) -> PresenceTable:
    return PresenceTable("A", grace)


def users(diffs: Iterable[PresenceDiff], side: str) -> list[tuple[str, str]]:
    """``(room, user)`` of every join (side="joins") or leave in ``diffs``."""
    return [(d.room, u) for d in diffs for u in getattr(d, side)]


# -- values ----------------------------------------------------------------------------------


def test_meta_data_is_a_read_only_copy() -> None:
    data = {"device": "phone"}
    meta = PresenceMeta("c1", "A", 1.0, data)
    data["device"] = "desk"
    assert meta.data == {"device": "phone"}
    with pytest.raises(TypeError, match="does not support item assignment"):
        meta.data["device"] = "desk"  # type: ignore[index]
    assert PresenceMeta("c1", "A", 1.0).data == {}


def test_diff_is_read_only() -> None:
    meta = PresenceMeta("c1", "A", 1.0)
    diff = PresenceDiff("r", joins={"u": [meta]})
    assert diff.joins == {"u": (meta,)}
    assert diff.leaves == {}
    with pytest.raises(TypeError, match="does not support item assignment"):
        diff.joins["v"] = ()  # type: ignore[index]


@pytest.mark.parametrize(("node", "grace"), [("", 1.0), ("A", -1.0), ("A", float("inf"))])
def test_bad_arguments_are_refused(node: str, grace: float) -> None:
    with pytest.raises(ValueError, match="^node" if node == "" else "^grace"):
        PresenceTable(node, grace)
    with pytest.raises(ValueError, match=r"^grace must be >= 0 and finite, got nan"):
        PresenceTable("A", float("nan"))


# -- join ------------------------------------------------------------------------------------


def test_first_connection_joins_the_user() -> None:
    t = table()
    diff = t.join("r", "alice", "c1", {"device": "phone"}, now=1.0)
    meta = PresenceMeta("c1", "A", 1.0, {"device": "phone"})
    assert diff == PresenceDiff("r", joins={"alice": (meta,)})
    assert t.state("r") == {"alice": (meta,)}
    assert "r" in t
    assert len(t) == 1
    assert t.nodes == {"A"}
    assert repr(t) == "<PresenceTable node='A' rooms=1 connections=1 in_grace=0>"


def test_another_tab_changes_no_presence() -> None:
    t = table()
    t.join("r", "alice", "c1", None, now=1.0)
    assert t.join("r", "alice", "c2", {"device": "desk"}, now=2.0) is None
    assert t.state("r") == {
        "alice": (PresenceMeta("c1", "A", 1.0), PresenceMeta("c2", "A", 2.0, {"device": "desk"}))
    }


def test_presence_is_per_room() -> None:
    t = table()
    assert t.join("r1", "alice", "c1", None, 0) is not None
    assert t.join("r2", "alice", "c1", None, 0) is not None  # the same connection, another room
    t.leave("r1", "c1", 1.0)
    assert [d.room for d in t.expire(1.0 + GRACE)] == ["r1"]
    assert t.state("r1") == {}
    assert list(t.state("r2")) == ["alice"]


def test_a_repeated_join_replaces_the_meta_silently() -> None:
    t = table()
    t.join("r", "alice", "c1", {"v": 1}, now=1.0)
    assert t.join("r", "alice", "c1", {"v": 2}, now=2.0) is None
    assert t.state("r") == {"alice": (PresenceMeta("c1", "A", 2.0, {"v": 2}),)}


def test_a_connection_belongs_to_one_user() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    with pytest.raises(LocalProtocolError, match="belongs to user 'alice'"):
        t.join("r2", "bob", "c1", None, 0)
    assert "r2" not in t  # nothing changed
    assert t.state("r") == {"alice": (PresenceMeta("c1", "A", 0),)}


# -- leave and the grace window ----------------------------------------------------------------


def test_multi_tab_user_leaves_after_last_tab_and_grace() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    t.join("r", "alice", "c2", None, 0)
    assert t.leave("r", "c1", now=5.0) is None  # still has c2
    assert t.next_deadline() is None
    assert t.expire(1000.0) == []
    assert t.leave("r", "c2", now=6.0) == 6.0 + GRACE  # the grace window starts
    assert t.next_deadline() == 16.0
    # In grace the user is still present, with the metas of the last connection.
    assert t.state("r") == {"alice": (PresenceMeta("c2", "A", 0),)}
    assert t.expire(15.999) == []
    assert t.expire(16.0) == [
        PresenceDiff("r", leaves={"alice": (PresenceMeta("c2", "A", 0),)})
    ]  # deadline <= now
    assert t.state("r") == {}
    assert t.next_deadline() is None
    assert len(t) == 0
    assert t.nodes == frozenset()


def test_reconnect_within_grace_emits_nothing() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    t.leave("r", "c1", now=1.0)
    assert t.join("r", "alice", "c2", None, now=1.0 + GRACE - 0.5) is None
    assert t.state("r") == {"alice": (PresenceMeta("c2", "A", 1.0 + GRACE - 0.5),)}
    assert t.next_deadline() is None  # the pending leave went stale
    assert t.expire(1000.0) == []
    assert list(t.state("r")) == ["alice"]


def test_reconnect_after_the_leave_was_published_joins_again() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    t.leave("r", "c1", now=1.0)
    assert users(t.expire(11.0), "leaves") == [("r", "alice")]
    diff = t.join("r", "alice", "c2", None, now=12.0)
    assert diff == PresenceDiff("r", joins={"alice": (PresenceMeta("c2", "A", 12.0),)})


def test_a_late_timer_does_not_flap() -> None:
    # The deadline passed but expire() has not run: the leave was never
    # published, so coming back is still silent.
    t = table()
    t.join("r", "alice", "c1", None, 0)
    t.leave("r", "c1", now=1.0)
    assert t.join("r", "alice", "c2", None, now=50.0) is None
    assert t.expire(50.0) == []


def test_grace_zero_leaves_at_the_next_expire() -> None:
    t = table(grace=0.0)
    t.join("r", "alice", "c1", None, 0)
    assert t.leave("r", "c1", now=3.0) == 3.0
    assert t.next_deadline() == 3.0
    assert users(t.expire(3.0), "leaves") == [("r", "alice")]


def test_leave_is_idempotent_and_ignores_strangers() -> None:
    t = table()
    assert t.leave("r", "nobody", 0) is None
    t.join("r", "alice", "c1", None, 0)
    assert t.leave("r2", "c1", 0) is None  # not in that room
    assert t.leave("r", "c1", 0) == GRACE
    assert t.leave("r", "c1", 1.0) is None  # already left: the window is not restarted
    assert t.next_deadline() == GRACE


def test_expire_merges_one_diff_per_room_in_due_order() -> None:
    t = table()
    for room, user, conn in [("r1", "a", "c1"), ("r2", "b", "c2"), ("r1", "c", "c3")]:
        t.join(room, user, conn, None, 0)
    t.leave("r2", "c2", now=1.0)
    t.leave("r1", "c1", now=2.0)
    t.leave("r1", "c3", now=3.0)
    assert t.next_deadline() == 11.0
    diffs = t.expire(100.0)
    assert [(d.room, list(d.leaves), dict(d.joins)) for d in diffs] == [
        ("r2", ["b"], {}),
        ("r1", ["a", "c"], {}),
    ]
    assert len(t) == 0


def test_flapping_keeps_the_deadline_queue_bounded() -> None:
    t = table()
    t.join("r", "alice", "c0", None, 0)
    for i in range(5000):
        t.leave("r", f"c{i}", now=i * 0.001)
        t.join("r", "alice", f"c{i + 1}", None, now=i * 0.001)
    assert t.next_deadline() is None
    assert len(t._heap) <= 2 * t._in_grace + 65  # stale entries are compacted
    assert t.expire(1e9) == []


def test_state_of_an_unknown_room_is_empty() -> None:
    assert table().state("nowhere") == {}


def test_state_is_a_snapshot() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    snapshot = t.state("r")
    t.join("r", "bob", "c2", None, 0)
    assert list(snapshot) == ["alice"]


# -- other nodes --------------------------------------------------------------------------------


def test_remote_join_and_leave_give_the_same_diffs_as_local_ones() -> None:
    local, remote = table(), table()
    meta = PresenceMeta("c1", "B", 1.0, {"device": "phone"})
    expected_join = PresenceDiff("r", joins={"alice": (meta,)})
    # Node B's own table sees a local join; node A replays it.
    node_b = PresenceTable("B", GRACE)
    assert node_b.join("r", "alice", "c1", {"device": "phone"}, 1.0) == expected_join
    assert remote.apply_remote_join("r", "alice", meta) == expected_join
    assert remote.apply_remote_leave("r", "B", "c1", now=2.0) == 12.0
    assert node_b.leave("r", "c1", now=2.0) == 12.0
    assert (
        remote.expire(12.0) == node_b.expire(12.0) == [PresenceDiff("r", leaves={"alice": (meta,)})]
    )
    assert local.state("r") == {}


def test_a_user_on_two_nodes_is_one_presence() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    assert (
        t.apply_remote_join("r", "alice", PresenceMeta("c1", "B", 0)) is None
    )  # same id, other node
    assert len(t.state("r")["alice"]) == 2
    t.leave("r", "c1", 1.0)
    assert t.expire(1000.0) == []  # still connected through node B
    assert t.state("r") == {"alice": (PresenceMeta("c1", "B", 0),)}


def test_reconnect_to_another_node_within_grace_emits_nothing() -> None:
    t = table()
    t.join("r", "alice", "c1", None, 0)
    t.leave("r", "c1", 1.0)
    assert t.apply_remote_join("r", "alice", PresenceMeta("x9", "B", 2.0)) is None
    assert t.expire(1000.0) == []


def test_echoes_of_own_events_are_ignored() -> None:
    t = table()
    # Our join echoed back after the connection already left: no ghost.
    t.join("r", "alice", "c1", None, 0)
    t.leave("r", "c1", 1.0)
    assert t.apply_remote_join("r", "alice", PresenceMeta("c1", "A", 0)) is None
    assert users(t.expire(1000.0), "leaves") == [("r", "alice")]
    assert t.state("r") == {}
    # Our leave echoed back after the same connection joined again: it stays.
    t.join("r", "bob", "c2", None, 0)
    t.leave("r", "c2", 1.0)
    t.join("r", "bob", "c2", None, 2.0)
    assert t.apply_remote_leave("r", "A", "c2", 3.0) is None
    assert t.next_deadline() is None
    assert list(t.state("r")) == ["bob"]


def test_remote_leave_of_an_unknown_connection_is_ignored() -> None:
    t = table()
    assert t.apply_remote_leave("r", "B", "c1", 0) is None
    t.apply_remote_join("r", "alice", PresenceMeta("c1", "B", 0))
    assert t.apply_remote_leave("r", "C", "c1", 0) is None  # another node's c1
    assert list(t.state("r")) == ["alice"]


def test_drop_node_leaves_after_grace_unless_users_are_elsewhere() -> None:
    t = table()
    t.join("r", "alice", "a1", None, 0)  # alice: here and on B
    t.apply_remote_join("r", "alice", PresenceMeta("b1", "B", 0))
    t.apply_remote_join("r", "bob", PresenceMeta("b2", "B", 0))  # bob: only on B, two rooms
    t.apply_remote_join("r2", "bob", PresenceMeta("b2", "B", 0))
    t.apply_remote_join("r", "carol", PresenceMeta("c1", "C", 0))  # carol: on C
    assert t.nodes == {"A", "B", "C"}
    assert t.drop_node("B", now=30.0) == 40.0  # lease expired at 30: grace from there
    assert t.nodes == {"A", "C"}
    assert t.connections("B") == []
    assert set(t.state("r")) == {"alice", "bob", "carol"}  # bob is in grace
    assert t.expire(39.0) == []
    diffs = t.expire(40.0)
    assert sorted(users(diffs, "leaves")) == [("r", "bob"), ("r2", "bob")]
    assert set(t.state("r")) == {"alice", "carol"}
    assert "r2" not in t


def test_drop_node_of_an_unknown_node_or_users_present_elsewhere() -> None:
    t = table()
    assert t.drop_node("Z", 0) is None
    t.join("r", "alice", "a1", None, 0)
    t.apply_remote_join("r", "alice", PresenceMeta("b1", "B", 0))
    assert t.drop_node("B", 0) is None  # no one entered grace


def test_a_node_cannot_drop_itself() -> None:
    t = table()
    t.join("r", "alice", "a1", None, 0)
    with pytest.raises(LocalProtocolError):
        t.drop_node("A", 0)
    assert list(t.state("r")) == ["alice"]


def test_connections_lists_room_user_meta() -> None:
    t = table()
    t.join("r1", "alice", "a1", None, 0)
    t.join("r2", "alice", "a1", None, 1.0)
    b = PresenceMeta("b1", "B", 2.0)
    t.apply_remote_join("r1", "bob", b)
    assert t.connections("A") == [
        ("r1", "alice", PresenceMeta("a1", "A", 0)),
        ("r2", "alice", PresenceMeta("a1", "A", 1.0)),
    ]
    assert t.connections("B") == [("r1", "bob", b)]
    assert t.connections("nope") == []
    assert len(t.connections()) == 3


def test_resync_with_a_node_emits_only_real_changes() -> None:
    # The recipe from the module docstring: drop the node, replay its snapshot.
    t = table()
    for user, cid in [("alice", "b1"), ("bob", "b2")]:
        t.apply_remote_join("r", user, PresenceMeta(cid, "B", 0))
    node_b = PresenceTable("B", GRACE)  # what B really holds now: bob left, carol came
    node_b.join("r", "alice", "b1", None, 0)
    node_b.join("r", "carol", "b3", None, 5.0)
    t.drop_node("B", now=10.0)
    diffs = [t.apply_remote_join(room, user, meta) for room, user, meta in node_b.connections("B")]
    assert users([d for d in diffs if d is not None], "joins") == [("r", "carol")]
    assert users(t.expire(20.0), "leaves") == [("r", "bob")]
    assert set(t.state("r")) == {"alice", "carol"}


# -- the property: state, diffs and connections always agree -------------------------------------

NODES = ["A", "B", "C"]  # "A" is the table's own node
USERS = ["u0", "u1", "u2"]
ROOMS = ["r0", "r1"]
CONNS = ["c0", "c1", "c2", "c3", "c4"]

#: Each step: (what, room, node, connection, seconds to advance for "tick").
Op = tuple[str, str, str, str, float]
OPS = st.lists(
    st.tuples(
        st.sampled_from(["join", "join", "leave", "leave", "tick", "drop", "echo"]),
        st.sampled_from(ROOMS),
        st.sampled_from(NODES),
        st.sampled_from(CONNS),
        st.sampled_from([0.0, 1.0, 4.0, 5.0, 20.0]),
    ),
    min_size=10,
    max_size=80,
)


def user_of(conn: str) -> str:
    """Each connection id always belongs to the same user (on every node)."""
    return USERS[CONNS.index(conn) % len(USERS)]


@settings(max_examples=300, deadline=None)
@given(grace=st.sampled_from([0.0, 5.0]), ops=OPS)
def test_presence_model(grace: float, ops: list[Op]) -> None:
    t = PresenceTable("A", grace)
    now = 0.0
    # The model: live connections (room, node, conn) and pending leaves (room, user) -> deadline.
    live: set[tuple[str, str, str]] = set()
    pending: dict[tuple[str, str], float] = {}
    # What a client sees: the users of each room, built only from the diffs.
    view: dict[str, set[str]] = {room: set() for room in ROOMS}

    def connected(room: str, user: str) -> bool:
        return any(r == room and user_of(c) == user for r, _, c in live)

    def apply(diff: PresenceDiff) -> None:
        assert not set(diff.joins) & set(diff.leaves)
        for user in diff.leaves:
            assert user in view[diff.room]  # only a present user leaves
            assert not connected(diff.room, user)  # never while still connected
            view[diff.room].discard(user)
        for user, metas in diff.joins.items():
            assert user not in view[diff.room]  # only an absent user joins
            assert metas
            view[diff.room].add(user)

    def remove(room: str, node: str, conn: str, started: float | None) -> None:
        # Model of a leave: the grace window starts when no connection is left.
        expected = None
        if (room, node, conn) in live:
            live.discard((room, node, conn))
            user = user_of(conn)
            if not connected(room, user):
                expected = pending[(room, user)] = now + grace
        assert started == expected

    for op, room, node, conn, dt in ops:
        if op == "join":
            user = user_of(conn)
            was_present = connected(room, user) or (room, user) in pending
            if node == "A":
                diff = t.join(room, user, conn, None, now)
            else:
                diff = t.apply_remote_join(room, user, PresenceMeta(conn, node, now))
            live.add((room, node, conn))
            pending.pop((room, user), None)  # back within grace: silent
            assert (diff is None) == was_present
            if diff is not None:
                assert list(diff.joins) == [user]
                apply(diff)
        elif op == "leave":
            if node == "A":
                started = t.leave(room, conn, now)
            else:
                started = t.apply_remote_leave(room, node, conn, now)
            remove(room, node, conn, started)
        elif op == "tick":
            now += dt
            diffs = t.expire(now)
            due = {key for key, deadline in pending.items() if deadline <= now}
            assert {(d.room, u) for d in diffs for u in d.leaves} == due
            assert len({d.room for d in diffs}) == len(diffs)  # one diff per room
            for d in diffs:
                assert not d.joins
                apply(d)
            for key in due:
                del pending[key]
        elif op == "drop" and node == "A":
            with pytest.raises(LocalProtocolError):
                t.drop_node(node, now)
        elif op == "drop":
            started = t.drop_node(node, now)
            gone = sorted(entry for entry in live if entry[1] == node)
            starts = set()
            for gone_room, _, gone_conn in gone:
                live.discard((gone_room, node, gone_conn))
                if not connected(gone_room, user_of(gone_conn)):
                    pending[(gone_room, user_of(gone_conn))] = now + grace
                    starts.add(now + grace)
            assert started == (starts.pop() if starts else None)
        else:  # our own join, echoed back by the backplane: ignored
            assert t.apply_remote_join(room, user_of(conn), PresenceMeta(conn, "A", now)) is None
            assert t.apply_remote_leave(room, "A", conn, now) is None

        # Invariants after every step.
        for name in ROOMS:
            present = {user_of(c) for r, _, c in live if r == name}
            in_grace = {u for (r, u) in pending if r == name}
            assert not present & in_grace
            state = t.state(name)
            assert set(state) == present | in_grace
            assert set(state) == view[name]  # diffs replayed reproduce the state
            assert all(state.values())  # every present user has at least one meta
            for user, metas in state.items():
                if user in present:
                    assert {(m.node, m.connection_id) for m in metas} == {
                        (n, c) for r, n, c in live if r == name and user_of(c) == user
                    }
            assert (name in t) == bool(state)  # empty rooms are forgotten
        assert t.next_deadline() == (min(pending.values()) if pending else None)
        assert t.nodes == {n for _, n, _ in live}
        assert {(r, m.node, m.connection_id) for r, _, m in t.connections()} == live

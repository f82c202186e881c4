"""Admission: limits counted by reservations, decided without I/O."""

from __future__ import annotations

from chatcore.sansio import Accept, Admission, Reject


def test_screen_refuses_draining_capacity_and_foreign_origins() -> None:
    gate = Admission(max_connections=1, allowed_origins={"https://a.example"}, retry_after=7)
    assert gate.screen(None) is None
    assert gate.screen("https://a.example") is None
    assert gate.screen("https://evil.example") == Reject(403, b"origin not allowed")
    assert gate.admit("id", "alice", None) == Accept("id")
    assert gate.screen(None) == Reject(503, b"server at capacity", (("retry-after", "7"),))
    gate.release("alice", None)
    gate.draining = True
    refusal = gate.screen(None)
    assert refusal is not None
    assert refusal.status == 503
    assert refusal.body == b"server is draining; reconnect shortly"
    assert gate.rejected == 3


def test_admit_rechecks_and_reserves_per_user_and_address() -> None:
    gate = Admission(max_per_user=2, max_per_address=3)
    assert isinstance(gate.admit("a1", "alice", "10.0.0.1"), Accept)
    assert isinstance(gate.admit("a2", "alice", "10.0.0.1"), Accept)
    assert gate.admit("a3", "alice", "10.0.0.2") == Reject(
        429, b"too many connections for this user"
    )
    assert isinstance(gate.admit("b1", "bob", "10.0.0.1"), Accept)
    assert gate.admit("c1", "carol", "10.0.0.1") == Reject(
        429, b"too many connections from this address"
    )
    assert isinstance(gate.admit("c1", "carol", None), Accept)  # no address: no address limit
    assert (gate.reserved, gate.reserved_by("alice")) == (4, 2)
    gate.release("alice", "10.0.0.1")
    assert isinstance(gate.admit("c2", "carol", "10.0.0.1"), Accept)
    for user, address in (("alice", "10.0.0.1"), ("bob", "10.0.0.1"), ("carol", None)):
        gate.release(user, address)
    gate.release("carol", "10.0.0.1")
    assert (gate.reserved, gate.reserved_by("alice"), gate.reserved_by("carol")) == (0, 0, 0)
    assert repr(gate) == "<Admission OPEN reserved=0 rejected=2>"


def test_admit_sees_a_drain_that_began_during_authentication() -> None:
    gate = Admission()
    assert gate.screen(None) is None
    gate.draining = True
    decision = gate.admit("id", "alice", None)
    assert isinstance(decision, Reject)
    assert decision.status == 503
    assert gate.reserved == 0
    gate.count_rejection()
    assert gate.rejected == 2

"""The connection state machine and close arbiter (plain synchronous tests)."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chatcore.sansio import (
    TRANSITIONS,
    CloseArbiter,
    CloseCause,
    CloseOutcome,
    CloseRecord,
    ConnectionState,
    Input,
    LocalProtocolError,
    handshake_status_for,
)
from chatcore.sansio.__main__ import main, mermaid_state_diagram

S = ConnectionState
ROOT = Path(__file__).resolve().parent.parent

#: Every state, and the inputs that lead there from CONNECTING, in order.
PATH_TO: dict[ConnectionState, tuple[Input, ...]] = {
    S.CONNECTING: (),
    S.OPEN: (Input.ACCEPT,),
    S.CLOSING: (Input.ACCEPT, Input.CLOSE),
    S.CLOSED: (Input.ACCEPT, Input.CLOSE, Input.FINISH),
    S.REJECTED: (Input.REJECT,),
}


def feed(arbiter: CloseArbiter, event: Input) -> object:
    """Apply one input through the arbiter's public API."""
    if event is Input.ACCEPT:
        arbiter.accept()
        return None
    if event is Input.REJECT:
        return arbiter.reject(403, "forbidden")
    if event is Input.CLOSE:
        return arbiter.close(1000, "bye", CloseCause.APP)
    assert event is Input.FINISH
    arbiter.finish()
    return None


def arbiter_in(state: ConnectionState) -> CloseArbiter:
    arbiter = CloseArbiter()
    for event in PATH_TO[state]:
        feed(arbiter, event)
    assert arbiter.state is state
    return arbiter


def ident(value: object) -> str:
    """Readable pytest ids for states, inputs and (state, input) keys."""
    if isinstance(value, tuple):
        return "-".join(ident(v) for v in value)
    assert isinstance(value, ConnectionState | Input)
    return value.name


def reachable() -> set[ConnectionState]:
    seen = {S.CONNECTING}
    frontier = [S.CONNECTING]
    while frontier:
        state = frontier.pop()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in seen:
                seen.add(dst)
                frontier.append(dst)
    return seen


# -- the table ---------------------------------------------------------------


def test_table_is_exactly_the_documented_machine() -> None:
    assert TRANSITIONS == {
        (S.CONNECTING, Input.ACCEPT): S.OPEN,
        (S.CONNECTING, Input.REJECT): S.REJECTED,
        (S.CONNECTING, Input.CLOSE): S.REJECTED,
        (S.OPEN, Input.CLOSE): S.CLOSING,
        (S.CLOSING, Input.CLOSE): S.CLOSING,
        (S.CLOSING, Input.FINISH): S.CLOSED,
        (S.CLOSED, Input.CLOSE): S.CLOSED,
        (S.CLOSED, Input.FINISH): S.CLOSED,
        (S.REJECTED, Input.CLOSE): S.REJECTED,
        (S.REJECTED, Input.FINISH): S.REJECTED,
    }


def test_every_state_is_reachable_and_close_is_allowed_everywhere() -> None:
    assert reachable() == set(ConnectionState)
    # Closing must never be a caller bug: that is what makes it idempotent.
    for state in ConnectionState:
        assert (state, Input.CLOSE) in TRANSITIONS


@pytest.mark.parametrize(("key", "target"), list(TRANSITIONS.items()), ids=ident)
def test_every_transition_in_the_table(
    key: tuple[ConnectionState, Input], target: ConnectionState
) -> None:
    state, event = key
    arbiter = arbiter_in(state)
    feed(arbiter, event)
    assert arbiter.state is target


ABSENT = [pair for pair in itertools.product(ConnectionState, Input) if pair not in TRANSITIONS]


def test_absent_pairs_are_the_expected_ones() -> None:
    assert set(ABSENT) == {
        (S.CONNECTING, Input.FINISH),
        (S.OPEN, Input.ACCEPT),
        (S.OPEN, Input.REJECT),
        (S.OPEN, Input.FINISH),
        (S.CLOSING, Input.ACCEPT),
        (S.CLOSING, Input.REJECT),
        (S.CLOSED, Input.ACCEPT),
        (S.CLOSED, Input.REJECT),
        (S.REJECTED, Input.ACCEPT),
        (S.REJECTED, Input.REJECT),
    }


@pytest.mark.parametrize(("state", "event"), ABSENT, ids=ident)
def test_every_absent_pair_raises_and_changes_nothing(state: ConnectionState, event: Input) -> None:
    arbiter = arbiter_in(state)
    record = arbiter.record
    with pytest.raises(LocalProtocolError, match=rf"cannot {event.value} .* {state.name}"):
        feed(arbiter, event)
    assert arbiter.state is state
    assert arbiter.record is record


# -- the first close wins ------------------------------------------------------


def test_first_close_wins_and_later_ones_return_the_same_record() -> None:
    arbiter = CloseArbiter()
    arbiter.accept()
    first = arbiter.close(4000, "heartbeat timeout", CloseCause.HEARTBEAT)
    assert first == CloseOutcome(
        True, CloseRecord(4000, "heartbeat timeout", CloseCause.HEARTBEAT, None)
    )
    assert arbiter.state is S.CLOSING
    assert arbiter.record is first.record

    second = arbiter.close(1000, "", CloseCause.APP)
    third = arbiter.close(1012, "restart", CloseCause.SHUTDOWN, http_status=503)
    for later in (second, third):
        assert later.initiated is False
        assert later.record is first.record
    assert arbiter.record == CloseRecord(4000, "heartbeat timeout", CloseCause.HEARTBEAT)

    arbiter.finish()
    after = arbiter.close(1011, "crash", CloseCause.INTERNAL)
    assert after == CloseOutcome(False, first.record)
    assert after.record is first.record
    assert (arbiter.state, arbiter.record) == (S.CLOSED, first.record)


def test_close_when_open_ignores_http_status() -> None:
    arbiter = arbiter_in(S.OPEN)
    outcome = arbiter.close(1012, "restart", CloseCause.SHUTDOWN, http_status=503)
    assert outcome.record.http_status is None


def test_not_closing_means_no_record() -> None:
    assert CloseArbiter().record is None
    assert arbiter_in(S.OPEN).record is None


# -- closing or refusing during the handshake ----------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [(1008, 403), (1011, 500), (1012, 503), (1013, 503), (4002, 403), (1000, 403), (4000, 403)],
)
def test_handshake_status_for(code: int, status: int) -> None:
    assert handshake_status_for(code) == status


@pytest.mark.parametrize("code", [1000, 1008, 1011, 1012, 1013, 4001])
def test_close_while_connecting_becomes_a_refusal(code: int) -> None:
    arbiter = CloseArbiter()
    outcome = arbiter.close(code, "nope", CloseCause.SHUTDOWN)
    assert arbiter.state is S.REJECTED
    assert outcome == CloseOutcome(
        True, CloseRecord(code, "nope", CloseCause.SHUTDOWN, handshake_status_for(code))
    )
    assert not arbiter.accepting_messages


def test_explicit_http_status_wins_while_connecting() -> None:
    arbiter = CloseArbiter()
    outcome = arbiter.close(1012, "draining", CloseCause.SHUTDOWN, http_status=429)
    assert outcome.record.http_status == 429
    assert arbiter.close(1000, "", CloseCause.APP).record.http_status == 429


@pytest.mark.parametrize(
    ("status", "code"), [(401, 1008), (403, 1008), (429, 1008), (500, 1011), (503, 1013)]
)
def test_reject_records_the_status(status: int, code: int) -> None:
    arbiter = CloseArbiter()
    outcome = arbiter.reject(status, "go away")
    assert arbiter.state is S.REJECTED
    assert outcome == CloseOutcome(True, CloseRecord(code, "go away", CloseCause.REJECTED, status))
    assert arbiter.record is outcome.record
    # A close after a refusal is the usual no-op returning the refusal.
    later = arbiter.close(1000, "", CloseCause.APP)
    assert later == CloseOutcome(False, outcome.record)
    assert later.record is outcome.record
    arbiter.finish()
    assert arbiter.state is S.REJECTED


def test_reject_after_accept_raises() -> None:
    arbiter = arbiter_in(S.OPEN)
    with pytest.raises(LocalProtocolError):
        arbiter.reject(403)
    assert arbiter.state is S.OPEN
    assert arbiter.record is None


@pytest.mark.parametrize("refuse", ["reject", "close"])
def test_accept_after_refusal_raises(refuse: str) -> None:
    arbiter = CloseArbiter()
    if refuse == "reject":
        record = arbiter.reject(401).record
    else:
        record = arbiter.close(1012, "", CloseCause.SHUTDOWN).record
    with pytest.raises(LocalProtocolError, match="cannot accept"):
        arbiter.accept()
    assert arbiter.state is S.REJECTED
    assert arbiter.record is record


def test_reject_twice_raises() -> None:
    arbiter = CloseArbiter()
    record = arbiter.reject(403).record
    with pytest.raises(LocalProtocolError):
        arbiter.reject(401)
    assert arbiter.record is record
    assert record.http_status == 403


# -- finish ----------------------------------------------------------------------


@pytest.mark.parametrize("state", [S.CONNECTING, S.OPEN])
def test_finish_needs_a_close_first(state: ConnectionState) -> None:
    arbiter = arbiter_in(state)
    with pytest.raises(LocalProtocolError, match="cannot finish"):
        arbiter.finish()
    assert arbiter.state is state


def test_finish_is_idempotent_once_closed() -> None:
    arbiter = arbiter_in(S.CLOSING)
    record = arbiter.record
    arbiter.finish()
    arbiter.finish()
    assert arbiter.state is S.CLOSED
    assert arbiter.record is record


# -- accepting_messages and causes ------------------------------------------------


@pytest.mark.parametrize("state", list(ConnectionState))
def test_accepting_messages_only_when_open(state: ConnectionState) -> None:
    assert arbiter_in(state).accepting_messages is (state is S.OPEN)


@pytest.mark.parametrize("cause", list(CloseCause))
def test_peer_gone(cause: CloseCause) -> None:
    assert cause.peer_gone is (cause in {CloseCause.PEER, CloseCause.TRANSPORT})


# -- a random walk through the machine ---------------------------------------------

CODES = st.sampled_from([1000, 1001, 1003, 1006, 1008, 1009, 1011, 1012, 1013, 4000, 4001, 4002])
STATUSES = st.sampled_from([400, 401, 403, 429, 500, 503, 599])


class ArbiterMachine(RuleBasedStateMachine):
    """Drive one arbiter with random requests; the table is the oracle."""

    def __init__(self) -> None:
        super().__init__()
        self.arbiter = CloseArbiter()
        #: What the table says the state is.
        self.expected = S.CONNECTING
        #: The first record seen, to check it never changes afterwards.
        self.first_record: CloseRecord | None = None
        self.reachable = reachable()

    def _step(self, event: Input, action: Callable[[], object]) -> object:
        before_state, before_record = self.arbiter.state, self.arbiter.record
        target = TRANSITIONS.get((self.expected, event))
        if target is None:
            with pytest.raises(LocalProtocolError):
                action()
            assert self.arbiter.state is before_state
            assert self.arbiter.record is before_record
            return None
        result = action()
        self.expected = target
        return result

    def _check_outcome(self, outcome: object, record: CloseRecord) -> None:
        assert isinstance(outcome, CloseOutcome)
        if self.first_record is None:
            assert outcome.initiated
            assert outcome.record == record
            self.first_record = outcome.record
        else:
            assert not outcome.initiated
            assert outcome.record is self.first_record

    @rule()
    def accept(self) -> None:
        self._step(Input.ACCEPT, self.arbiter.accept)

    @rule(status=STATUSES, reason=st.text(max_size=5))
    def reject(self, status: int, reason: str) -> None:
        outcome = self._step(Input.REJECT, lambda: self.arbiter.reject(status, reason))
        if outcome is not None:
            assert isinstance(outcome, CloseOutcome)
            assert outcome.initiated
            assert outcome.record.http_status == status
            assert outcome.record.cause is CloseCause.REJECTED
            self.first_record = outcome.record

    @rule(
        code=CODES,
        reason=st.text(max_size=5),
        cause=st.sampled_from(CloseCause),
        http_status=st.none() | STATUSES,
    )
    def close(self, code: int, reason: str, cause: CloseCause, http_status: int | None) -> None:
        was = self.expected
        outcome = self._step(
            Input.CLOSE, lambda: self.arbiter.close(code, reason, cause, http_status)
        )
        if was is S.CONNECTING:
            expected_status = handshake_status_for(code) if http_status is None else http_status
        else:
            expected_status = None
        self._check_outcome(outcome, CloseRecord(code, reason, cause, expected_status))

    @rule()
    def finish(self) -> None:
        self._step(Input.FINISH, self.arbiter.finish)

    @invariant()
    def state_follows_the_table(self) -> None:
        assert self.arbiter.state is self.expected
        assert self.arbiter.state in self.reachable

    @invariant()
    def at_most_one_record_and_it_never_changes(self) -> None:
        assert self.arbiter.record is self.first_record
        # A record exists exactly once a close was decided.
        assert (self.arbiter.record is None) is (self.arbiter.state in (S.CONNECTING, S.OPEN))

    @invariant()
    def accepting_messages_iff_open(self) -> None:
        assert self.arbiter.accepting_messages is (self.arbiter.state is S.OPEN)


ArbiterMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=25, deadline=None)
TestArbiterMachine = ArbiterMachine.TestCase


@given(st.lists(st.tuples(CODES, st.sampled_from(CloseCause)), min_size=1, max_size=10))
def test_racing_closes_from_open_record_only_the_first(
    requests: list[tuple[int, CloseCause]],
) -> None:
    arbiter = arbiter_in(S.OPEN)
    outcomes = [arbiter.close(code, f"r{i}", cause) for i, (code, cause) in enumerate(requests)]
    code, cause = requests[0]
    assert [o.initiated for o in outcomes] == [True] + [False] * (len(requests) - 1)
    assert all(o.record is outcomes[0].record for o in outcomes)
    assert outcomes[0].record == CloseRecord(code, "r0", cause)


# -- the diagram in docs/lifecycle.md -------------------------------------------------


def test_diagram_has_one_edge_per_transition_and_marks_start_and_ends() -> None:
    lines = mermaid_state_diagram().splitlines()
    assert lines[0] == "stateDiagram-v2"
    edges = [line.strip() for line in lines[1:]]
    for (state, event), target in TRANSITIONS.items():
        assert edges.count(f"{state.name} --> {target.name}: {event.value}") == 1
    assert "[*] --> CONNECTING" in edges
    assert {e for e in edges if e.endswith("--> [*]")} == {"CLOSED --> [*]", "REJECTED --> [*]"}
    assert len(edges) == len(TRANSITIONS) + 3


def test_the_docs_diagram_is_the_generated_one() -> None:
    doc = (ROOT / "docs" / "lifecycle.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```mermaid\n(.*?)\n```", doc, flags=re.DOTALL)
    assert blocks == [mermaid_state_diagram()], (
        "docs/lifecycle.md is out of date: paste the output of "
        "`python -m chatcore.sansio --diagram` into its mermaid block"
    )


def test_cli_prints_the_diagram(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--diagram"]) == 0
    assert capsys.readouterr().out == mermaid_state_diagram() + "\n"
    assert main([]) == 2
    assert "--diagram" in capsys.readouterr().err


def test_python_dash_m_runs() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "chatcore.sansio", "--diagram"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == mermaid_state_diagram() + "\n"

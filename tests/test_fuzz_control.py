"""Fuzzing the control plane's decoders: handshake frames, MACed session frames, a client's
handshake answer, every operation's argument parser and the stage access check.

Each gets arbitrary bytes or JSON values: only the documented errors come out (ProtocolError,
AuthError, a closed connection), never another exception, never a handler run by a frame that
failed its checks.
"""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path

import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from dpmigrate.errors import AuthError, ProtocolError
from dpmigrate.runtime import control, stage_access
from dpmigrate.runtime.operations import parse

TOKEN = "fuzz-token-0123456789"
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner,
                                                                 max_size=5),
    max_leaves=8,
)  # fmt: skip
EXPECTED = (ProtocolError, AuthError, ConnectionError)


def _feed(data: bytes) -> socket.socket:
    """A socket whose peer sent ``data`` and then hung up."""
    ours, theirs = socket.socketpair()
    theirs.sendall(data)
    theirs.close()
    ours.settimeout(5)
    return ours


@fuzz
@given(st.binary(max_size=600))
def test_handshake_frames_from_arbitrary_bytes(data: bytes) -> None:
    sock = _feed(data)
    with sock:
        try:
            frame = control.recv_frame(sock)
        except EXPECTED:
            return
    assert isinstance(frame, dict) and frame["v"] == control.VERSION


@fuzz
@given(st.binary(max_size=64), json_values)
def test_handshake_frames_from_framed_json(prefix: bytes, value: object) -> None:
    body = prefix + json.dumps(value).encode()
    sock = _feed(len(body).to_bytes(4, "big") + body)
    with sock, contextlib.suppress(EXPECTED):
        control.recv_frame(sock)


@fuzz
@given(st.binary(max_size=400), st.booleans())
def test_session_frames_fail_their_mac_or_decode(data: bytes, framed: bool) -> None:
    if framed:
        data = len(data).to_bytes(4, "big") + data
    sock = _feed(data)
    with sock:
        session = control.Session(sock, b"k" * 32, "cluster", b"a", "n1")
        with pytest.raises(EXPECTED):
            session.recv()


@fuzz
@given(json_values)
def test_session_frames_with_a_valid_mac_and_any_json(value: object) -> None:
    """A peer that holds the session key but sends any JSON: a dict of this version, or one
    ProtocolError."""
    ours, theirs = socket.socketpair()
    with ours, theirs:
        sender = control.Session(theirs, b"k" * 32, "cluster", b"c", "n1")
        receiver = control.Session(ours, b"k" * 32, "cluster", b"a", "n1")
        try:
            sender.send({"v": control.VERSION, "x": value})
        except ProtocolError:
            return  # too large to send
        got = receiver.recv()
        assert got["v"] == control.VERSION


@fuzz
@given(st.dictionaries(st.sampled_from(["v", "as", "nonce", "auth", "x"]), json_values,
                       max_size=5))  # fmt: skip
def test_a_client_answer_that_is_not_a_proof_is_refused(answer: dict[str, object]) -> None:
    answer.setdefault("v", control.VERSION)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.settimeout(5)
        ours.settimeout(5)
        data = json.dumps(answer).encode()
        theirs.sendall(len(data).to_bytes(4, "big") + data)  # before the hello: it is buffered
        with pytest.raises(EXPECTED):
            control.server_handshake(ours, lambda p: TOKEN.encode(), "n1")


def _operations(tmp: Path) -> list[tuple[str, type]]:
    from dpmigrate import agentd

    agent = agentd.build("n1", TOKEN, tmp)
    return [(name, agent.operations.get(name).request_type)
            for name in sorted(agent.operations.names())]  # fmt: skip


@pytest.fixture(scope="module")
def operations(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, type]]:
    return _operations(tmp_path_factory.mktemp("ops"))


def test_every_operations_arguments_parse_or_are_refused(
    operations: list[tuple[str, type]],
) -> None:
    assert len(operations) > 20  # the services' operations are there too

    @fuzz
    @given(st.sampled_from(operations), st.dictionaries(st.text(max_size=12), json_values,
                                                         max_size=6) | json_values)
    def check(op: tuple[str, type], args: object) -> None:
        name, record = op
        try:
            parse(record, args, name)
        except ProtocolError as err:
            assert "\n" not in str(err) and str(err)

    check()


names = st.sampled_from(["flows", "table", "gen", "other", "flows.gen-table", "flows.x.statesync",
                         "flows.table.statesync", ""]) | st.text(max_size=20)  # fmt: skip


@fuzz
@given(st.sampled_from(sorted(stage_access.STAGE_OPERATIONS)) | st.text(max_size=12),
       st.dictionaries(st.sampled_from(["app", "stage", "ring", "x"]), names | json_values,
                       max_size=4) | json_values)  # fmt: skip
def test_the_stage_access_check_refuses_or_passes(op: object, args: object) -> None:
    try:
        stage_access.check("flows", "table", op, args)
    except ProtocolError as err:
        assert str(err)

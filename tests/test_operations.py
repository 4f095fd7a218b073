"""Typed operations: request records, their validation, and the operation table (no root)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dpmigrate.errors import DpmigrateError, ProtocolError
from dpmigrate.runtime.operations import (
    AbsPath,
    Name,
    NoArgs,
    OperationTable,
    Request,
    parse,
)


@dataclasses.dataclass(frozen=True)
class Everything(Request):
    app: Name
    path: AbsPath
    text: str
    count: int
    timeout: float
    flag: bool
    extra: dict[str, Any]
    items: list[Any]
    names: list[Name]
    endpoint: tuple[str, int]
    maybe: tuple[str, int] | None


GOOD: dict[str, Any] = {
    "app": "flows.v2:a-b_c",
    "path": "/var/lib/dpmigrate/run-1/x.toml",
    "text": "anything at all, even ../ or a/b",
    "count": 3,
    "timeout": 2,
    "flag": False,
    "extra": {"positions": {"inputs": {}}},
    "items": [1, "two", None],
    "names": ["a", "b.c"],
    "endpoint": ["10.0.0.2", 7070],
    "maybe": None,
}


def test_parse_accepts_a_good_record_and_converts() -> None:
    req = parse(Everything, GOOD, "everything")
    assert req.app == "flows.v2:a-b_c" and req.path.endswith("x.toml")
    assert req.timeout == 2.0 and type(req.timeout) is float  # an int is a number
    assert req.endpoint == ("10.0.0.2", 7070)
    assert req.maybe is None and req.names == ["a", "b.c"]
    assert parse(Everything, {**GOOD, "maybe": ["h", 1]}).maybe == ("h", 1)
    assert parse(Everything, {**GOOD, "timeout": 0.25}).timeout == 0.25
    assert parse(NoArgs, {}) == NoArgs()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"count": "3"}, "'count' has the wrong type string; expected an int"),
        ({"count": True}, "'count' has the wrong type bool; expected an int"),
        ({"count": 3.0}, "'count' has the wrong type float; expected an int"),
        ({"timeout": False}, "'timeout' has the wrong type bool; expected a number"),
        ({"timeout": float("nan")}, "'timeout' is nan; expected a finite number"),
        ({"flag": 1}, "'flag' has the wrong type int; expected a bool"),
        ({"text": None}, "'text' has the wrong type null; expected a string"),
        ({"extra": []}, "'extra' has the wrong type array; expected an object"),
        ({"items": {}}, "'items' has the wrong type object; expected an array"),
        ({"names": ["a", "../b"]}, r"'names'\[1\] is not valid: '../b' is not a name"),
        ({"endpoint": ["h"]}, r"'endpoint' has 1 item; expected \[a string, an int\]$"),
        ({"endpoint": ["h", "80"]}, r"'endpoint'\[1\] has the wrong type string; expected an int"),
        (
            {"maybe": "h:1"},
            r"'maybe' has the wrong type string; expected \[a string, an int\] or null",
        ),
        ({"app": 5}, "'app' has the wrong type int; expected a name"),
    ],
)
def test_parse_refuses_a_wrong_type_naming_op_and_argument(
    change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ProtocolError, match=f"^operation 'everything': argument {message}"):
        parse(Everything, {**GOOD, **change}, "everything")


@pytest.mark.parametrize(
    "name",
    [
        "",
        "../../../tmp/evil",
        "..",
        ".",
        ".hidden",
        "-option",
        "a/b",
        "a b",
        "é",
        "a\n",
        "x" * 129,
        "a\0b",
    ],
)
def test_a_bad_name_is_refused(name: str) -> None:
    with pytest.raises(ProtocolError, match=r"argument 'app' is not valid: .* is not a name"):
        parse(Everything, {**GOOD, "app": name}, "everything")


def test_a_long_name_is_accepted_up_to_128() -> None:
    assert parse(Everything, {**GOOD, "app": "a" * 128}).app == "a" * 128


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("relative/x.toml", "is not an absolute path"),
        ("", "is not an absolute path"),
        ("~/x", "is not an absolute path"),
        ("/var/../etc/shadow", "has a '..' component"),
        ("/var/lib/..", "has a '..' component"),
        ("/a\0b", "contains a NUL byte"),
        ("/a\ud800", "is not valid UTF-8"),
        ("/" + "x" * 5000, "is longer than 4096 bytes"),
    ],
)
def test_a_bad_path_is_refused(path: str, problem: str) -> None:
    with pytest.raises(ProtocolError, match=f"argument 'path' is not valid: .*{problem}"):
        parse(Everything, {**GOOD, "path": path}, "everything")


def test_dots_inside_a_path_component_are_fine() -> None:
    assert parse(Everything, {**GOOD, "path": "/a/..b/c../.d"}).path == "/a/..b/c../.d"


def test_missing_and_extra_arguments_are_refused() -> None:
    missing = {k: v for k, v in GOOD.items() if k != "timeout"}
    with pytest.raises(
        ProtocolError, match=r"^operation 'everything': missing argument 'timeout' .a number.$"
    ):
        parse(Everything, missing, "everything")
    with pytest.raises(
        ProtocolError, match=r"^operation 'everything': unknown argument.s. 'zzz'; it takes 'app',"
    ):
        parse(Everything, {**GOOD, "zzz": 1}, "everything")
    with pytest.raises(
        ProtocolError, match=r"^operation 'ping': unknown argument.s. 'x'; it takes none"
    ):
        parse(NoArgs, {"x": 1}, "ping")
    with pytest.raises(ProtocolError, match="'args' must be an object, not array"):
        parse(NoArgs, [], "ping")


def test_a_field_with_a_default_may_be_left_out() -> None:
    @dataclasses.dataclass(frozen=True)
    class WithDefault(Request):
        app: Name
        wake: bool = True

    assert parse(WithDefault, {"app": "a"}) == WithDefault("a", True)
    assert parse(WithDefault, {"app": "a", "wake": False}).wake is False


def test_a_record_must_be_a_frozen_dataclass_with_known_annotations() -> None:
    table = OperationTable(lambda event, **fields: None)

    @dataclasses.dataclass
    class Mutable(Request):
        app: Name

    @dataclasses.dataclass(frozen=True)
    class Nested(Request):
        rows: list[list[int]]

    @dataclasses.dataclass(frozen=True)
    class Unknown(Request):
        when: bytes

    @dataclasses.dataclass(frozen=True)
    class NotARequest:
        app: Name

    with pytest.raises(TypeError, match="frozen"):
        table.register("mutable", Mutable, lambda req: None)
    with pytest.raises(TypeError, match="items must be scalars"):
        table.register("nested", Nested, lambda req: None)
    with pytest.raises(TypeError, match="not supported"):
        table.register("unknown", Unknown, lambda req: None)
    with pytest.raises(TypeError, match="deriving from Request"):
        table.register("plain", NotARequest, lambda req: None)  # type: ignore[type-var]
    assert table.names() == []


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.calls: list[Any] = []

    def __call__(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))


@dataclasses.dataclass(frozen=True)
class Echo(Request):
    app: Name
    n: int


def _table() -> tuple[OperationTable, Recorder]:
    log = Recorder()
    table = OperationTable(log)

    def echo(req: Echo) -> dict[str, Any]:
        log.calls.append(req)
        return {"app": req.app, "n": req.n}

    def refuse(_: NoArgs) -> None:
        raise DpmigrateError("stage 'a/b' is not running on node n1")

    def crash(_: NoArgs) -> None:
        raise RuntimeError("a bug")

    table.register("ping", NoArgs, lambda _: {"pong": True})
    table.register("echo", Echo, echo)
    table.register("refuse", NoArgs, refuse)
    table.register("crash", NoArgs, crash)
    return table, log


def test_dispatch_replies_ok_or_error() -> None:
    table, log = _table()
    assert table.dispatch("echo", {"app": "a", "n": 2}) == {
        "ok": True,
        "result": {"app": "a", "n": 2},
    }
    assert table.dispatch("refuse", {}) == {
        "ok": False,
        "error": "stage 'a/b' is not running on node n1",
    }
    assert log.events == [], "a refusal is not an internal error"
    reply = table.dispatch("crash", {})
    assert reply == {"ok": False, "error": "internal error in crash: RuntimeError('a bug')"}
    ((event, fields),) = log.events
    assert event == "internal error" and fields["op"] == "crash"
    assert "RuntimeError: a bug" in fields["traceback"]
    assert table.dispatch("ping", {}) == {"ok": True, "result": {"pong": True}}


def test_an_invalid_request_reaches_no_handler() -> None:
    table, log = _table()
    for args in ({"app": "../x", "n": 1}, {"app": "a", "n": True}, {"app": "a"},
                 {"app": "a", "n": 1, "more": 2}, None, "a"):  # fmt: skip
        reply = table.dispatch("echo", args)
        assert reply["ok"] is False and reply["error"].startswith("operation 'echo': "), reply
    assert log.calls == [] and log.events == []


@pytest.mark.parametrize(
    "op",
    [
        "_handle",
        "run",
        "listen",
        "__init__",
        "dispatch",
        "register",
        "_ops",
        "op_ping",
        "no_such_op",
        "",
        None,
        5,
        ["ping"],
        {"op": "ping"},
    ],
)
def test_an_unregistered_operation_is_unknown_and_the_table_keeps_serving(op: object) -> None:
    table, log = _table()
    reply = table.dispatch(op, {})
    assert reply["ok"] is False
    assert reply["error"].startswith("unknown operation "), reply
    assert "this agent serves crash, echo, ping, refuse" in reply["error"]
    assert table.dispatch("ping", {}) == {"ok": True, "result": {"pong": True}}
    assert log.events == []


def test_a_name_is_registered_once() -> None:
    table, _ = _table()
    with pytest.raises(ValueError, match="'ping' is already registered"):
        table.register("ping", NoArgs, lambda _: None)
    assert table.dispatch("ping", {}) == {"ok": True, "result": {"pong": True}}
    for bad in ("", "Ping", "_ping", "__init__", "a-b", "a b", "x" * 65):
        with pytest.raises(ValueError, match="must match"):
            table.register(bad, NoArgs, lambda _: None)


def test_the_agent_serves_exactly_its_table(tmp_path: Path) -> None:
    """The core's operations plus the migration, standby and metrics services', and nothing
    else."""
    from dpmigrate import agentd
    from dpmigrate.migrate import agent_service
    from dpmigrate.runtime import failover, metrics
    from dpmigrate.runtime.agent import Agent

    bare = Agent("n0", "token", tmp_path / "bare")
    core = {"ping", "status", "shutdown", "register", "unregister", "lookup", "placement", "ring_key",
            "ring_tls", "start_stage", "stop_stage", "stop_app", "forget_app"}  # fmt: skip
    assert set(bare.operations.names()) == core
    agent = agentd.build("n1", "token", tmp_path)
    added = set(agent.operations.names()) - core
    assert {"checkpoint_stage", "restore_stage", "quiesce_stage", "wake_stage", "facts"} <= added
    assert {"standbys", "mark_standby", "record_migration"} <= added
    for name in added:  # every other operation is one that a known service registered
        handler = agent.operations.get(name).handler
        module = handler.__module__
        assert (
            module.startswith(agent_service.__name__.rpartition(".")[0])
            or (module == failover.__name__ and name in ("standbys", "mark_standby"))
            or (module == metrics.__name__ and name == "record_migration")
        ), name
    args = {"app": "../../../tmp/evil", "stage": "s", "manifest": str(tmp_path / "m.toml"),
            "run_dir": str(tmp_path / "run"), "model": "multi-node"}  # fmt: skip
    reply = agent.operations.dispatch("start_stage", args)
    assert reply["ok"] is False and "'app' is not valid" in reply["error"]
    assert agent.supervisor.stages == {} and agent.stage_args == {}
    status = agent.operations.dispatch("status", {})
    result = status["result"]
    assert status["ok"] is True and result["stages"] == [] and result["registry"] == {}
    assert result["store"]["reachable"] is False  # an agent without a cluster store


def test_the_runtime_imports_neither_migrate_nor_checkpoint() -> None:
    """Dependencies point one way: migrate -> runtime/checkpoint -> transports."""
    code = (
        "import sys, dpmigrate.runtime.agent, dpmigrate.runtime.operations;"
        "bad = sorted(m for m in sys.modules if m.startswith(('dpmigrate.migrate',"
        " 'dpmigrate.checkpoint')));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr

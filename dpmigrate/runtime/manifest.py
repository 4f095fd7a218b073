"""The app manifest (TOML): stages, rings and defaults, validated into an :class:`App`.

    [app]
    name = "flows"

    [defaults]
    capacity = 1024          # ring window, messages (absent: the place's default,
                             # DPMIGRATE_RING_CAPACITY, passed in as ``ring_capacity``)
    batch = 32               # messages per batch

    [stages.gen]
    entry = "stages:Generator"   # module:Class, module found next to the manifest first
    node = "node1"
    config = { sources = 4, total = 20000 }

    [[rings]]
    from = "gen.out"             # stage.port
    to = "table.in"
    capacity = 1024              # optional
    transport = "auto"           # auto | mem | shm | tcp (auto: by deployment model)

Every problem is one :class:`ConfigError` naming the file and the key (or, for TOML syntax,
the line): unknown stage or port, duplicate ring, a cycle, a missing entry point, wrong types.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import tomllib
from pathlib import Path
from typing import Any

from dpmigrate.errors import ConfigError
from dpmigrate.runtime.stage import Service
from dpmigrate.transports.base import DEFAULT_CAPACITY
from dpmigrate.transports.resolver import NAME_RE

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$")
_TRANSPORT_HINTS = ("auto", "mem", "shm", "tcp")


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str
    node: str
    config: dict[str, Any]
    batch: int
    #: nodes that run a hot standby of the stage (DESIGN.md §5), in order of preference
    standbys: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RingSpec:
    name: str
    src_stage: str
    src_port: str
    dst_stage: str
    dst_port: str
    capacity: int
    transport: str


@dataclasses.dataclass(frozen=True)
class App:
    """A validated app: stages in topological order (sources first) and the rings between."""

    name: str
    path: Path
    stages: tuple[StageSpec, ...]
    rings: tuple[RingSpec, ...]

    @classmethod
    def load(cls, path: str | Path, *, ring_capacity: int = DEFAULT_CAPACITY) -> App:
        return load(path, ring_capacity=ring_capacity)

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise ConfigError(f"app {self.name!r} has no stage {name!r}")

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node the app needs: where its stages run and where their standbys do."""
        return tuple(dict.fromkeys(n for s in self.stages for n in (s.node, *s.standbys)))

    def service_class(self, stage: str) -> type[Service]:
        return resolve_entry(self.stage(stage).entry, self.path, f"stages.{stage}.entry")


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        raise ConfigError(f"{where}: must be {what}, got {type(value).__name__} {value!r}")
    return value


def _positive(value: Any, where: str) -> int:
    _expect(value, int, where, "a positive integer")
    if value < 1:
        raise ConfigError(f"{where}: must be a positive integer, got {value}")
    return value


def resolve_entry(entry: str, manifest: Path, where: str) -> type[Service]:
    """Import ``module:Class``; the manifest's folder is searched first."""
    module_name, sep, class_name = entry.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(f"{manifest}: {where} = {entry!r} must look like 'module:Class'")
    folder = str(manifest.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{manifest}: {where}: cannot import module {module_name!r}: {err}"
        ) from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(
            f"{manifest}: {where}: {entry!r} is not a dpmigrate Service subclass "
            f"(module {module_name!r} has {'no' if cls is None else 'a non-Service'} "
            f"{class_name!r})"
        )
    return cls


def load(path: str | Path, *, ring_capacity: int = DEFAULT_CAPACITY) -> App:
    """Read and validate a manifest; raise one ConfigError naming the problem's key or line.

    ``ring_capacity`` is the capacity of a ring for which the manifest gives none (neither
    the ring's ``capacity`` nor ``defaults.capacity``): the environment's setting
    (``DPMIGRATE_RING_CAPACITY``), which an entry point reads and passes in."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"app manifest {path} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from err
    where = str(path)
    unknown = set(raw) - {"app", "defaults", "stages", "rings"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {sorted(unknown)}; "
            "expected app, defaults, stages, rings"
        )
    app = _expect(raw.get("app", {}), dict, f"{where}: [app]", "a table")
    name = _expect(app.get("name"), str, f"{where}: app.name", "a string")
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"{where}: app.name {name!r} must be a letter then letters, digits, _ or -"
        )
    defaults = _expect(raw.get("defaults", {}), dict, f"{where}: [defaults]", "a table")
    default_capacity = _positive(
        defaults.get("capacity", ring_capacity), f"{where}: defaults.capacity"
    )
    default_batch = _positive(defaults.get("batch", 32), f"{where}: defaults.batch")
    default_node = _expect(
        defaults.get("node", "node1"), str, f"{where}: defaults.node", "a string"
    )

    stages_raw = _expect(raw.get("stages"), dict, f"{where}: [stages]", "a table of stages")
    if not stages_raw:
        raise ConfigError(f"{where}: [stages] is empty; an app needs at least one stage")
    stages: dict[str, StageSpec] = {}
    for sname, body in stages_raw.items():
        key = f"{where}: stages.{sname}"
        if not _NAME_RE.match(sname):
            raise ConfigError(f"{key}: stage names are a letter then letters, digits, _ or -")
        _expect(body, dict, key, "a table")
        extra = set(body) - {"entry", "node", "config", "batch", "standby"}
        if extra:
            raise ConfigError(
                f"{key}: unknown key(s) {sorted(extra)}; expected entry, node, config, batch, "
                "standby"
            )
        if "entry" not in body:
            raise ConfigError(f"{key}.entry is missing: name the stage class as 'module:Class'")
        node = _expect(body.get("node", default_node), str, f"{key}.node", "a node name")
        stages[sname] = StageSpec(
            name=sname,
            entry=_expect(body["entry"], str, f"{key}.entry", "a 'module:Class' string"),
            node=node,
            config=_expect(body.get("config", {}), dict, f"{key}.config", "a table"),
            batch=_positive(body.get("batch", default_batch), f"{key}.batch"),
            standbys=_standbys(body.get("standby", []), node, f"{key}.standby"),
        )

    rings: dict[str, RingSpec] = {}
    used_ports: dict[str, str] = {}
    for i, body in enumerate(
        _expect(raw.get("rings", []), list, f"{where}: [[rings]]", "an array of tables")
    ):
        key = f"{where}: rings[{i}]"
        _expect(body, dict, key, "a table")
        extra = set(body) - {"name", "from", "to", "capacity", "transport"}
        if extra:
            raise ConfigError(
                f"{key}: unknown key(s) {sorted(extra)}; "
                "expected name, from, to, capacity, transport"
            )
        ends = []
        for field in ("from", "to"):
            ref = _expect(body.get(field), str, f"{key}.{field}", "'stage.port'")
            stage, dot, port = ref.partition(".")
            if not dot or not port:
                raise ConfigError(f"{key}.{field} = {ref!r} must look like 'stage.port'")
            if stage not in stages:
                raise ConfigError(
                    f"{key}.{field} = {ref!r} names unknown stage {stage!r}; "
                    f"stages are {sorted(stages)}"
                )
            ends.append((stage, port))
        (src, sport), (dst, dport) = ends
        rname = _expect(
            body.get("name", f"{src}.{sport}-{dst}.{dport}"), str, f"{key}.name", "a string"
        )
        if rname in rings:
            raise ConfigError(f"{key}.name: duplicate ring {rname!r}")
        for ref in (f"out:{src}.{sport}", f"in:{dst}.{dport}"):
            if ref in used_ports:
                raise ConfigError(
                    f"{key}: port {ref[ref.index(':') + 1 :]} is already used by ring "
                    f"{used_ports[ref]!r} (rings are single-producer single-consumer)"
                )
            used_ports[ref] = rname
        transport = _expect(body.get("transport", "auto"), str, f"{key}.transport", "a string")
        if transport not in _TRANSPORT_HINTS:
            raise ConfigError(
                f"{key}.transport = {transport!r}; choose one of {', '.join(_TRANSPORT_HINTS)}"
            )
        capacity = _positive(body.get("capacity", default_capacity), f"{key}.capacity")
        rings[rname] = RingSpec(rname, src, sport, dst, dport, capacity, transport)

    order = _topological(stages, rings.values(), where)
    app_obj = App(name, path, tuple(stages[s] for s in order), tuple(rings.values()))
    for spec in app_obj.stages:  # import every entry point now: fail before anything starts
        cls = resolve_entry(spec.entry, path, f"stages.{spec.name}.entry")
        for ring in app_obj.rings:
            if ring.src_stage == spec.name and ring.src_port not in cls.outputs:
                raise ConfigError(
                    f"{where}: ring {ring.name!r}: stage {spec.name!r} ({spec.entry}) has no "
                    f"output port {ring.src_port!r}; its outputs are {list(cls.outputs)}"
                )
            if ring.dst_stage == spec.name and ring.dst_port not in cls.inputs:
                raise ConfigError(
                    f"{where}: ring {ring.name!r}: stage {spec.name!r} ({spec.entry}) has no "
                    f"input port {ring.dst_port!r}; its inputs are {list(cls.inputs)}"
                )
    return app_obj


def _standbys(value: Any, node: str, where: str) -> tuple[str, ...]:
    """``standby = "node3"`` or a list of nodes: each another node than the stage's, once."""
    names = [value] if isinstance(value, str) else value
    _expect(names, list, where, "a node name or a list of node names")
    for name in names:
        _expect(name, str, where, "a node name or a list of node names")
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: {name!r} is not a valid node name")
        if name == node:
            raise ConfigError(
                f"{where}: {name!r} is the node the stage runs on; a standby must be on "
                "another node (it takes over when that one dies)"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: {names} names a node twice")
    return tuple(names)


def _topological(stages: dict[str, StageSpec], rings: Any, where: str) -> list[str]:
    """Stage names, producers before consumers; a cycle is an error naming its stages."""
    edges: dict[str, set[str]] = {s: set() for s in stages}
    for ring in rings:
        edges[ring.src_stage].add(ring.dst_stage)
    order: list[str] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, path: list[str]) -> None:
        if state.get(node) == 2:
            return
        if state.get(node) == 1:
            cycle = [*path[path.index(node) :], node]
            raise ConfigError(
                f"{where}: rings form a cycle {' -> '.join(cycle)}; pipelines must be acyclic"
            )
        state[node] = 1
        for nxt in sorted(edges[node]):
            visit(nxt, [*path, node])
        state[node] = 2
        order.append(node)

    for node in stages:
        visit(node, [])
    return order[::-1]

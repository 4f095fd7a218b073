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
    resources = { cpus = "0-1", cpu_quota = 0.5, memory = "256M", io_weight = 100, pids = 64 }
                                 # optional: the stage's control group (runtime.cgroups)

    [[rings]]
    from = "gen.out"             # stage.port
    to = "table.in"
    capacity = 1024              # optional
    transport = "auto"           # auto | mem | shm | tcp (auto: by deployment model)

Every problem is one :class:`ConfigError` naming the file and the key (or, for TOML syntax,
the line): unknown stage or port, duplicate ring, a cycle, a missing entry point, wrong types,
a file that is not UTF-8 or nested too deeply, a name that is not plain. Names (app, stages,
ports, rings, nodes) become file names, socket names and table keys elsewhere, so they are
held to a strict pattern here, once; values in a stage's ``config`` to what JSON can carry
(a TOML date cannot reach a stage on another node).
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
from dpmigrate.runtime.cgroups import Limits, parse_limits
from dpmigrate.runtime.stage import Service
from dpmigrate.transports.base import DEFAULT_CAPACITY
from dpmigrate.transports.resolver import NAME_RE

#: App, stage and port names: a strict subset of the project's NAME_RE (no '.' or ':', which
#: separate a stage from its port and an app from its stage elsewhere).
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,62}")
_ENTRY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*")
_TRANSPORT_HINTS = ("auto", "mem", "shm", "tcp")
_STAGE_KEYS = frozenset({"entry", "node", "config", "batch", "standby", "resources"})
#: The largest manifest read: an app's manifest is a few KiB.
MAX_MANIFEST_BYTES = 1 << 20
#: Bounds of a ring's capacity and a batch: larger is a typo, and would fail far from here.
MAX_CAPACITY = 1 << 30
MAX_BATCH = 1 << 20
#: How deep a stage's config may nest (it is sent to the stage as JSON).
_MAX_CONFIG_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    entry: str
    node: str
    config: dict[str, Any]
    batch: int
    #: nodes that run a hot standby of the stage (DESIGN.md §5), in order of preference
    standbys: tuple[str, ...] = ()
    #: its control group's limits (:mod:`dpmigrate.runtime.cgroups`); empty: no group
    resources: Limits = dataclasses.field(default_factory=Limits)


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
    #: per-run limits (:meth:`with_resources`): stage -> its whole limits, merged and
    #: validated; a multi-node run records them for the agents (``apps/<app>`` in the store)
    resource_overrides: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path, *, ring_capacity: int = DEFAULT_CAPACITY) -> App:
        return load(path, ring_capacity=ring_capacity)

    def with_resources(
        self, overrides: dict[str, dict[str, Any]], where: str = "resources"
    ) -> App:
        """This app with some stages' limits changed for one run: ``{"table": {"memory":
        "128M"}}`` sets those keys over the manifest's (the others stay), validated by the
        manifest's own rules; a ConfigError naming ``where``, the stage and the key."""
        if not isinstance(overrides, dict):
            raise ConfigError(f"{where}: must map stage names to tables of limits")
        names = [spec.name for spec in self.stages]
        unknown = [_key(str(u)) for u in sorted(set(overrides) - set(names))]
        if unknown:
            raise ConfigError(
                f"{where}: app {self.name!r} has no stage(s) {unknown}; its stages are {names}"
            )
        changed = dict(self.resource_overrides)
        stages = []
        for spec in self.stages:
            raw = overrides.get(spec.name)
            if raw is None:
                stages.append(spec)
                continue
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: {spec.name}: must be a table such as "
                                  f"{{ memory = \"256M\" }}, got {_show(raw)}")  # fmt: skip
            merged = {**spec.resources.as_dict(), **raw}
            limits = parse_limits(merged, f"{where}: {spec.name}")
            changed[spec.name] = limits.as_dict()
            stages.append(dataclasses.replace(spec, resources=limits))
        return dataclasses.replace(self, stages=tuple(stages), resource_overrides=changed)

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


def _show(value: Any) -> str:
    """``value`` for a one-line message: its repr, escaped to ASCII, cut short."""
    text = ascii(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _text(err: BaseException) -> str:
    """An error's message on one line (a decoder may quote the bad input)."""
    return ascii(str(err))[1:-1][:200]


def _key(name: str) -> str:
    """A TOML key as it may appear in a message (a quoted key may hold anything)."""
    return name if _NAME_RE.fullmatch(name) else _show(name)


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if (isinstance(value, bool) and kind is int) or not isinstance(value, kind):
        raise ConfigError(f"{where}: must be {what}, got {type(value).__name__} {_show(value)}")
    return value


def _positive(value: Any, where: str, most: int) -> int:
    _expect(value, int, where, "a positive integer")
    if not 1 <= value <= most:
        raise ConfigError(f"{where}: must be a positive integer up to {most}, got {_show(value)}")
    return value


def _name(value: Any, where: str, what: str, pattern: re.Pattern[str] = _NAME_RE) -> str:
    """``value`` if it is a string matching ``pattern`` whole (a final newline included)."""
    _expect(value, str, where, what)
    if not pattern.fullmatch(value):
        raise ConfigError(f"{where}: {_show(value)} is not {what} (it must match "
                          f"{pattern.pattern})")  # fmt: skip
    return value


def _plain(value: Any, where: str, depth: int = 0) -> dict[str, Any]:
    """A stage's config: tables, arrays, strings, numbers and booleans only, not too deep."""
    if depth > _MAX_CONFIG_DEPTH:
        raise ConfigError(f"{where}: nested more than {_MAX_CONFIG_DEPTH} deep")
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in items:
        if isinstance(item, dict | list):
            _plain(item, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]",
                   depth + 1)  # fmt: skip
        elif not isinstance(item, str | int | float | bool):
            raise ConfigError(
                f"{where}: {_show(key)} is a {type(item).__name__}; a stage's config holds "
                "strings, numbers, booleans, arrays and tables"
            )
    return value


def resolve_entry(entry: str, manifest: Path, where: str) -> type[Service]:
    """Import ``module:Class``; the manifest's folder is searched first."""
    module_name, _, class_name = entry.partition(":")
    if not _ENTRY_RE.fullmatch(entry):
        raise ConfigError(f"{manifest}: {where} = {_show(entry)} must look like 'module:Class' "
                          "(a dotted module name, then a class name)")  # fmt: skip
    folder = str(manifest.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # the user's module may raise anything while it is imported
        raise ConfigError(
            f"{manifest}: {where}: cannot import module {module_name!r}: "
            f"{type(err).__name__}: {_show(str(err))}; fix the module or the entry"
        ) from err
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Service)):
        raise ConfigError(
            f"{manifest}: {where}: {entry!r} is not a dpmigrate Service subclass "
            f"(module {module_name!r} has {'no' if cls is None else 'a non-Service'} "
            f"{class_name!r})"
        )
    return cls


def _parse(path: Path) -> dict[str, Any]:
    """The manifest's TOML as a dict; one ConfigError for a missing, unreadable, oversized,
    non-UTF-8, too deeply nested or malformed file."""
    try:
        with open(path, "rb") as manifest:
            data = manifest.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as err:
        raise ConfigError(f"app manifest {path} does not exist") from err
    except OSError as err:
        raise ConfigError(f"app manifest {path}: cannot read it ({err.strerror})") from err
    if len(data) > MAX_MANIFEST_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_MANIFEST_BYTES} bytes; not an app manifest")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 (line {line}); save it as UTF-8") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {_text(err)}") from err
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be an app manifest") from None
    except ValueError as err:  # an integer of too many digits
        raise ConfigError(f"{path}: not valid TOML: {_text(err)}") from err


def load(path: str | Path, *, ring_capacity: int = DEFAULT_CAPACITY) -> App:
    """Read and validate a manifest; raise one ConfigError naming the problem's key or line.

    ``ring_capacity`` is the capacity of a ring for which the manifest gives none (neither
    the ring's ``capacity`` nor ``defaults.capacity``): the environment's setting
    (``DPMIGRATE_RING_CAPACITY``), which an entry point reads and passes in."""
    path = Path(path)
    raw = _parse(path)
    where = str(path)
    unknown = set(raw) - {"app", "defaults", "stages", "rings"}
    if unknown:
        raise ConfigError(
            f"{where}: unknown top-level key(s) {sorted(unknown)}; "
            "expected app, defaults, stages, rings"
        )
    app = _expect(raw.get("app", {}), dict, f"{where}: [app]", "a table")
    name = _name(app.get("name"), f"{where}: app.name",
                 "an app name (a letter, then letters, digits, _ or -)")  # fmt: skip
    defaults = _expect(raw.get("defaults", {}), dict, f"{where}: [defaults]", "a table")
    default_capacity = _positive(
        defaults.get("capacity", ring_capacity), f"{where}: defaults.capacity", MAX_CAPACITY
    )
    default_batch = _positive(defaults.get("batch", 32), f"{where}: defaults.batch", MAX_BATCH)
    default_node = _name(defaults.get("node", "node1"), f"{where}: defaults.node",
                         "a node name", NAME_RE)  # fmt: skip

    stages_raw = _expect(raw.get("stages"), dict, f"{where}: [stages]", "a table of stages")
    if not stages_raw:
        raise ConfigError(f"{where}: [stages] is empty; an app needs at least one stage")
    stages: dict[str, StageSpec] = {}
    for sname, body in stages_raw.items():
        key = f"{where}: stages.{_key(sname)}"
        if not _NAME_RE.fullmatch(sname):
            raise ConfigError(f"{key}: stage names are a letter then letters, digits, _ or -")
        _expect(body, dict, key, "a table")
        extra = set(body) - _STAGE_KEYS
        if extra:
            raise ConfigError(
                f"{key}: unknown key(s) {sorted(extra)}; expected entry, node, config, batch, "
                "standby, resources"
            )
        if "entry" not in body:
            raise ConfigError(f"{key}.entry is missing: name the stage class as 'module:Class'")
        node = _name(body.get("node", default_node), f"{key}.node", "a node name", NAME_RE)
        stages[sname] = StageSpec(
            name=sname,
            entry=_expect(body["entry"], str, f"{key}.entry", "a 'module:Class' string"),
            node=node,
            config=_plain(
                _expect(body.get("config", {}), dict, f"{key}.config", "a table"), f"{key}.config"
            ),
            batch=_positive(body.get("batch", default_batch), f"{key}.batch", MAX_BATCH),
            standbys=_standbys(body.get("standby", []), node, f"{key}.standby"),
            resources=parse_limits(body.get("resources", {}), f"{key}.resources"),
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
            if not dot or not _NAME_RE.fullmatch(stage) or not _NAME_RE.fullmatch(port):
                raise ConfigError(f"{key}.{field} = {_show(ref)} must look like 'stage.port' "
                                  "(each a letter, then letters, digits, _ or -)")  # fmt: skip
            if stage not in stages:
                raise ConfigError(
                    f"{key}.{field} = {ref!r} names unknown stage {stage!r}; "
                    f"stages are {sorted(stages)}"
                )
            ends.append((stage, port))
        (src, sport), (dst, dport) = ends
        rname = _name(body.get("name", f"{src}.{sport}-{dst}.{dport}"), f"{key}.name",
                      "a ring name", NAME_RE)  # fmt: skip
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
                f"{key}.transport = {_show(transport)}; choose one of {', '.join(_TRANSPORT_HINTS)}"
            )
        capacity = _positive(
            body.get("capacity", default_capacity), f"{key}.capacity", MAX_CAPACITY
        )
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


def parse_resource_options(items: list[str] | tuple[str, ...], files: tuple[str, ...] = ()
                           ) -> dict[str, dict[str, Any]]:  # fmt: skip
    """``--resources STAGE.KEY=VALUE`` options (VALUE read as a TOML value when it is one:
    ``0.5``, ``64``; else as text: ``256M``, ``0-1``) and ``--resources-file FILE`` (TOML:
    ``[STAGE]`` tables of limits), as overrides for :meth:`App.with_resources`; later ones win.
    A ConfigError naming the option, one line."""
    out: dict[str, dict[str, Any]] = {}
    for name in files:
        try:
            raw = tomllib.loads(Path(name).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"--resources-file {name}: {_text(err)}") from err
        for stage, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"--resources-file {name}: {_key(stage)} must be a table "
                                  f"[{_key(stage)}] of limits, got {_show(table)}")  # fmt: skip
            out.setdefault(stage, {}).update(table)
    for item in items:
        target, eq, text = item.partition("=")
        stage, dot, key = target.rpartition(".")
        if not eq or not dot or not stage or not key or not text:
            raise ConfigError(f"--resources {_show(item)}: expected STAGE.KEY=VALUE, e.g. "
                              "table.memory=256M or table.cpu_quota=0.5")  # fmt: skip
        try:
            value: Any = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        out.setdefault(stage, {})[key] = value
    return out


def stage_resources(path: str | Path, stage: str) -> Limits:
    """The limits of one stage, from the manifest's TOML alone: for the node agent, which
    must apply them before the stage runs but never imports an app's code (:func:`load`
    imports every entry point). Validated as :func:`load` does; one ConfigError."""
    path = Path(path)
    raw = _parse(path)
    stages = raw.get("stages")
    body = stages.get(stage) if isinstance(stages, dict) else None
    if not isinstance(body, dict):
        raise ConfigError(f"{path}: no stage {_show(stage)} in [stages]; is it the app's manifest?")
    return parse_limits(body.get("resources", {}), f"{path}: stages.{_key(stage)}.resources")


def _standbys(value: Any, node: str, where: str) -> tuple[str, ...]:
    """``standby = "node3"`` or a list of nodes: each another node than the stage's, once."""
    names = [value] if isinstance(value, str) else value
    _expect(names, list, where, "a node name or a list of node names")
    for name in names:
        _expect(name, str, where, "a node name or a list of node names")
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: {_show(name)} is not a valid node name")
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

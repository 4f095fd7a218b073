"""Settings: every one has a default and a ``DPMIGRATE_*`` environment variable.

Twelve-factor: the app manifest describes the app, the environment describes the place. A bad
value is a :class:`~dpmigrate.errors.ConfigError` that names the variable, the value and what
a good value looks like — never a traceback deep inside the code that first used it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from dpmigrate.errors import ConfigError

#: Where scripts/setup installs the private CRIU 4.2 and pycriu (DESIGN.md §4).
DEFAULT_PREFIX = "/opt/dpmigrate"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a positive number of seconds")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("must be one of 1/0, true/false, yes/no, on/off")


def _log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in {"debug", "info", "warning", "error"}:
        raise ValueError("must be debug, info, warning or error")
    return level


def _absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    return text


def _token(text: str) -> str:
    if text and len(text) < 16:
        raise ValueError("must be at least 16 characters (or empty to use the generated one)")
    return text


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its field name, environment variable, default text and parser."""

    field: str
    env: str
    default: str | Callable[[], str]
    parse: Callable[[str], Any]
    help: str

    def default_text(self) -> str:
        return self.default() if callable(self.default) else self.default


def _default_criu() -> str:
    private = Path(DEFAULT_PREFIX) / "criu" / "bin" / "criu"
    if private.exists():
        return str(private)
    return shutil.which("criu") or str(private)


def _etcd_endpoints(text: str) -> str:
    for url in (e.strip() for e in text.split(",") if e.strip()):
        if not url.startswith(("http://", "https://")):
            raise ValueError("must be comma-separated http://HOST:PORT or https://HOST:PORT")
    return text.strip()


def _optional_path(text: str) -> str:
    return _absolute_path(text) if text else ""


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port from 1 to 65535, or 0 for off")
    return value


def _hugepages(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65536:
        raise ValueError("must be a number of 2 MB pages from 0 (none) to 65536")
    return value


def _ttl(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 300:
        raise ValueError("must be a whole number of seconds from 1 to 300")
    return value


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "criu",
        "DPMIGRATE_CRIU",
        _default_criu,
        _absolute_path,
        "criu binary (or wrapper) to run; scripts/setup installs CRIU 4.2 there",
    ),
    Setting(
        "prefix",
        "DPMIGRATE_PREFIX",
        DEFAULT_PREFIX,
        _absolute_path,
        "private prefix holding CRIU 4.2 and pycriu",
    ),
    Setting(
        "state_dir",
        "DPMIGRATE_STATE_DIR",
        "/var/lib/dpmigrate",
        _absolute_path,
        "where the cluster records what it created, registries and bundles",
    ),
    Setting(
        "token",
        "DPMIGRATE_TOKEN",
        "",
        _token,
        "cluster token authenticating control messages (empty: generated per cluster)",
    ),
    Setting(
        "log_level",
        "DPMIGRATE_LOG_LEVEL",
        "info",
        _log_level,
        "log level of agents and stages (debug, info, warning, error)",
    ),
    Setting(
        "ring_capacity",
        "DPMIGRATE_RING_CAPACITY",
        "1024",
        _positive_int,
        "default retained window of a ring, in messages",
    ),
    Setting(
        "reconnect_timeout",
        "DPMIGRATE_RECONNECT_TIMEOUT",
        "10",
        _positive_float,
        "seconds a ring end waits for its peer to come back before it is Broken",
    ),
    Setting(
        "etcd",
        "DPMIGRATE_ETCD",
        "",
        _etcd_endpoints,
        "etcd endpoints of an existing cluster store (empty: `cluster up` starts its own)",
    ),
    Setting("etcd_ca", "DPMIGRATE_ETCD_CA", "", _optional_path, "CA file for etcd over TLS"),
    Setting("etcd_cert", "DPMIGRATE_ETCD_CERT", "", _optional_path, "client certificate for etcd"),
    Setting("etcd_key", "DPMIGRATE_ETCD_KEY", "", _optional_path, "client key for etcd"),
    Setting(
        "node_ttl",
        "DPMIGRATE_NODE_TTL",
        "1",
        _ttl,
        "seconds of an agent's lease in etcd: a node silent for longer is known dead (and its "
        "stages' standbys take over)",
    ),
    Setting(
        "metrics_port",
        "DPMIGRATE_METRICS_PORT",
        "7071",
        _port,
        "TCP port on which each agent serves its Prometheus metrics (GET /metrics, on the "
        "node's own address; 0: off)",
    ),
    Setting(
        "ring_tls",
        "DPMIGRATE_RING_TLS",
        "0",
        _bool,
        "TLS 1.3 on tcp rings between nodes, with the cluster CA's ring certificate (for "
        "networks you do not trust; costs throughput, see the rings benchmark)",
    ),
    Setting(
        "hugepages",
        "DPMIGRATE_HUGEPAGES",
        "0",
        _hugepages,
        "2 MB hugepages `cluster up` reserves for the shm rings (given back by `cluster down`; "
        "0: none, rings use what is free, else 4 KB pages)",
    ),
    Setting(
        "strict",
        "DPMIGRATE_STRICT",
        "0",
        _bool,
        "treat a missing capability (CRIU, root, netns, nftables) as an error, not a skip "
        "(CI sets it)",
    ),
)


@dataclasses.dataclass(frozen=True)
class Config:
    criu: str
    prefix: str
    state_dir: str
    token: str
    log_level: str
    ring_capacity: int
    reconnect_timeout: float
    etcd: str
    etcd_ca: str
    etcd_cert: str
    etcd_key: str
    node_ttl: int
    metrics_port: int
    ring_tls: bool
    hugepages: int
    strict: bool

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read every setting from ``environ`` (default: os.environ), validating each."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for setting in SETTINGS:
            text = env.get(setting.env)
            source = "environment"
            if text is None:
                text, source = setting.default_text(), "default"
            try:
                values[setting.field] = setting.parse(text)
            except ValueError as err:
                reason = str(err)
                if "invalid literal" in reason or "could not convert" in reason:
                    reason = "is not a number"
                raise ConfigError(
                    f"{setting.env}={text!r} ({source}) {reason}; {setting.help}"
                ) from err
        return cls(**values)

    def describe(self) -> list[dict[str, Any]]:
        """Each setting with its variable, value and whether it came from the environment."""
        rows = []
        for setting in SETTINGS:
            value = getattr(self, setting.field)
            if setting.field == "token" and value:
                value = "<set>"
            rows.append(
                {
                    "name": setting.field,
                    "env": setting.env,
                    "value": value,
                    "from_env": setting.env in os.environ,
                    "help": setting.help,
                }
            )
        return rows


def load() -> Config:
    """The configuration of this process, from its environment."""
    return Config.from_env()

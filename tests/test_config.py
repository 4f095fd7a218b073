"""Configuration: defaults, DPMIGRATE_* overrides, and clear errors for bad values."""

from __future__ import annotations

import pytest
from support import run_cli

from dpmigrate.config import SETTINGS, Config
from dpmigrate.errors import ConfigError


def test_defaults_are_valid_and_typed() -> None:
    cfg = Config.from_env({})
    assert cfg.state_dir == "/var/lib/dpmigrate"
    assert cfg.ring_capacity == 1024 and isinstance(cfg.ring_capacity, int)
    assert cfg.reconnect_timeout == 10.0
    assert cfg.strict is False
    assert cfg.criu.startswith("/")


def test_environment_overrides_every_setting() -> None:
    env = {
        "DPMIGRATE_CRIU": "/usr/local/bin/criu",
        "DPMIGRATE_PREFIX": "/srv/dpm",
        "DPMIGRATE_STATE_DIR": "/tmp/dpm-state",
        "DPMIGRATE_TOKEN": "a-long-enough-cluster-token",
        "DPMIGRATE_LOG_LEVEL": "DEBUG",
        "DPMIGRATE_RING_CAPACITY": "64",
        "DPMIGRATE_RECONNECT_TIMEOUT": "2.5",
        "DPMIGRATE_STRICT": "yes",
        "DPMIGRATE_ETCD": "https://10.0.0.1:2379,https://10.0.0.2:2379",
        "DPMIGRATE_ETCD_CA": "/etc/dpm/ca.pem",
        "DPMIGRATE_ETCD_CERT": "/etc/dpm/client.pem",
        "DPMIGRATE_ETCD_KEY": "/etc/dpm/client.key",
        "DPMIGRATE_NODE_TTL": "7",
        "DPMIGRATE_METRICS_PORT": "9464",
        "DPMIGRATE_RING_TLS": "1",
        "DPMIGRATE_HUGEPAGES": "12",
    }
    assert {s.env for s in SETTINGS} == set(env), "a setting was added without a test"
    cfg = Config.from_env(env)
    assert (cfg.criu, cfg.prefix, cfg.state_dir) == (
        "/usr/local/bin/criu",
        "/srv/dpm",
        "/tmp/dpm-state",
    )
    assert cfg.token == "a-long-enough-cluster-token"
    assert cfg.log_level == "debug"
    assert cfg.ring_capacity == 64
    assert cfg.reconnect_timeout == 2.5
    assert cfg.strict is True
    assert cfg.etcd == "https://10.0.0.1:2379,https://10.0.0.2:2379"
    assert (cfg.etcd_ca, cfg.etcd_cert, cfg.etcd_key) == (
        "/etc/dpm/ca.pem", "/etc/dpm/client.pem", "/etc/dpm/client.key",
    )  # fmt: skip
    assert cfg.node_ttl == 7
    assert cfg.metrics_port == 9464
    assert cfg.ring_tls is True
    assert cfg.hugepages == 12


@pytest.mark.parametrize(
    ("var", "value", "phrase"),
    [
        ("DPMIGRATE_RING_CAPACITY", "abc", "is not a number"),
        ("DPMIGRATE_RING_CAPACITY", "0", "positive integer"),
        ("DPMIGRATE_RING_CAPACITY", "-5", "positive integer"),
        ("DPMIGRATE_RECONNECT_TIMEOUT", "soon", "is not a number"),
        ("DPMIGRATE_RECONNECT_TIMEOUT", "0", "positive number"),
        ("DPMIGRATE_RECONNECT_TIMEOUT", "inf", "positive number"),
        ("DPMIGRATE_STRICT", "maybe", "1/0, true/false"),
        ("DPMIGRATE_ETCD", "10.0.0.1:2379", "http://HOST:PORT"),
        ("DPMIGRATE_ETCD_CA", "ca.pem", "absolute path"),
        ("DPMIGRATE_NODE_TTL", "0", "from 1 to 300"),
        ("DPMIGRATE_NODE_TTL", "soon", "is not a number"),
        ("DPMIGRATE_METRICS_PORT", "65536", "0 for off"),
        ("DPMIGRATE_METRICS_PORT", "http", "is not a number"),
        ("DPMIGRATE_LOG_LEVEL", "loud", "debug, info, warning or error"),
        ("DPMIGRATE_STATE_DIR", "relative/dir", "absolute path"),
        ("DPMIGRATE_CRIU", "criu", "absolute path"),
        ("DPMIGRATE_TOKEN", "short", "at least 16 characters"),
        ("DPMIGRATE_HUGEPAGES", "-1", "number of 2 MB pages from 0"),
        ("DPMIGRATE_HUGEPAGES", "lots", "is not a number"),
    ],
)
def test_bad_values_name_the_variable_and_the_fix(var: str, value: str, phrase: str) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_env({var: value})
    message = str(info.value)
    assert var in message and repr(value) in message and phrase in message


def test_cli_reports_bad_config_in_one_line() -> None:
    result = run_cli("config", env={"DPMIGRATE_RING_CAPACITY": "lots"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "DPMIGRATE_RING_CAPACITY" in lines[0] and "Traceback" not in result.stderr


def test_cli_config_json_lists_every_setting() -> None:
    import json

    result = run_cli("config", "--json", env={"DPMIGRATE_RING_CAPACITY": "77"})
    assert result.returncode == 0, result.stderr
    rows = {row["env"]: row for row in json.loads(result.stdout)}
    assert set(rows) == {s.env for s in SETTINGS}
    assert rows["DPMIGRATE_RING_CAPACITY"]["value"] == 77
    assert rows["DPMIGRATE_RING_CAPACITY"]["from_env"] is True

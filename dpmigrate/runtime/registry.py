"""The ring-endpoint registry as ring ends see it in a cluster: the local node agent.

:class:`AgentResolver` implements the :class:`~dpmigrate.transports.resolver.Resolver`
interface by asking the agent of the network namespace the process runs in (abstract socket
``@dpmigrate-agent``). A stage that was moved to another node therefore asks that node's agent
without being told any address.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from dpmigrate.errors import ConfigError, RingTimeout
from dpmigrate.runtime.control import AgentClient, Credential, RemoteError
from dpmigrate.transports.resolver import Endpoint, check_ring_name

LOCAL_AGENT = "@dpmigrate-agent"
#: Where the agent that starts a stage puts the stage's own key (hex): the stage authenticates
#: to its agent with it, never with the cluster token.
STAGE_KEY_ENV = "DPMIGRATE_STAGE_KEY"


def stage_credential(app: str, stage: str, raw: str) -> Credential:
    """The credential of this stage process, from the key (hex) its agent gave it in
    :data:`STAGE_KEY_ENV`, which the stage host's entry point read."""
    try:
        key = bytes.fromhex(raw)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(
            f"{STAGE_KEY_ENV} is {'malformed' if raw else 'not set'}: a stage that uses its "
            "node's agent gets its key from the agent that starts it; start stages through "
            "`dpmigrate run` or an agent, not by hand"
        )
    return Credential.stage(app, stage, key)


class AgentResolver:
    """Resolver backed by the local agent (one authenticated connection, reopened if lost)."""

    def __init__(self, address: str, credential: Credential | str) -> None:
        """``address``: the agent (:data:`LOCAL_AGENT` for a stage's own); ``credential``: a
        stage's own (:func:`stage_credential`), or the cluster token for tools."""
        self.address = address
        self.credential = credential
        self._client: AgentClient | None = None
        self._lock = threading.Lock()
        #: ("app/stage", epoch) of the stage this resolver serves: stamped on its
        #: registrations, so the agent refuses those of a stale copy
        self.owner: tuple[str, int] | None = None

    def _call(self, op: str, **args: object) -> object:
        with self._lock:
            if self._client is None:
                self._client = AgentClient(self.address, self.credential, timeout=60)
            try:
                return self._client.call(op, **args)
            except Exception:
                self._client.close()
                self._client = None
                raise

    def register(self, ring: str, endpoint: Endpoint) -> None:
        if self.owner is not None:
            endpoint = dataclasses.replace(endpoint, owner=self.owner[0], epoch=self.owner[1])
        self._call("register", ring=check_ring_name(ring), endpoint=endpoint.as_dict())

    def unregister(self, ring: str) -> None:
        self._call("unregister", ring=check_ring_name(ring))

    def placement(self, app: str) -> dict[str, dict[str, object]]:
        """Where the cluster store places the app's stages: stage -> {"node", "epoch"}."""
        found = self._call("placement", app=app)
        if not isinstance(found, dict) or not isinstance(found.get("stages"), dict):
            raise RemoteError(f"agent at {self.address} answered placement with {found!r}")
        return found["stages"]

    def lookup(self, ring: str, timeout: float | None = 0) -> Endpoint:
        wait = 30.0 if timeout is None else max(0.0, timeout)
        found = self._call("lookup", ring=check_ring_name(ring), timeout=wait)
        if found is None:
            raise RingTimeout(
                f"ring {ring!r}: no producer registered with the node agent within {wait} s; "
                "is the producing stage running?"
            )
        return Endpoint.from_dict(found)

    def wait_newer(self, ring: str, generation: int, timeout: float) -> Endpoint | None:
        """Blocks in the agent, which answers the moment its etcd watch brings a newer
        endpoint (or when ``timeout`` ends)."""
        found = self._call("lookup", ring=check_ring_name(ring), timeout=max(0.0, timeout),
                           newer_than=generation)  # fmt: skip
        return None if found is None else Endpoint.from_dict(found)

    def standbys(self, app: str, stage: str) -> dict[str, Any]:
        """The stage's standby record (``nodes`` listed, ``in_sync``), fresh from the store."""
        found = self._call("standbys", app=app, stage=stage)
        if not isinstance(found, dict):
            raise RemoteError(f"agent at {self.address} answered standbys with {found!r}")
        return found

    def mark_standby(self, app: str, stage: str, node: str, in_sync: bool) -> None:
        """Record whether ``node``'s standby gates this stage; the agent accepts it only from
        the stage's current placement (this resolver's owner epoch)."""
        epoch = self.owner[1] if self.owner is not None else 0
        self._call("mark_standby", app=app, stage=stage, node=node, in_sync=in_sync,
                   epoch=epoch)  # fmt: skip

    def ring_key(self, ring: str) -> bytes:
        """The credential of ``ring`` (or of a statesync channel), from the agent."""
        found = self._call("ring_key", ring=check_ring_name(ring))
        key = found.get("key") if isinstance(found, dict) else None
        try:
            raw = bytes.fromhex(key) if isinstance(key, str) else b""
        except ValueError:
            raw = b""
        if len(raw) != 32:
            raise RemoteError(f"agent at {self.address} answered ring_key with {found!r}")
        return raw

    def ring_tls(self) -> dict[str, str]:
        """The rings' TLS CA, certificate and key (PEM) from the agent (ring_tls on)."""
        found = self._call("ring_tls")
        if not isinstance(found, dict) or not all(
            isinstance(found.get(k), str) and "-----BEGIN" in found[k]
            for k in ("ca", "cert", "key")
        ):
            raise RemoteError(f"agent at {self.address} answered ring_tls with no PEM files")
        return {k: found[k] for k in ("ca", "cert", "key")}

    def node_info(self) -> dict[str, object]:
        """The local agent's node name and the address this node's tcp rings listen on."""
        info = self._call("ping")
        if not isinstance(info, dict):
            raise RemoteError(f"agent at {self.address} answered ping with {info!r}")
        return info

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

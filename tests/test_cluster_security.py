"""A live cluster against the probe's findings: the token out of every stage, files not
world-readable, and a stranger at a ring's port affecting only itself (DESIGN.md §8).

One cluster, one flows run under traffic: a stranger from another node opens idle, garbage and
forged-HELLO connections to every ring's producer while the stream flows; the stream ends with
every packet exactly once and no stage restarted.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from pathlib import Path

from support import checker_of, in_netns, paced_flows, reference_checker, wait_for_input

from dpmigrate.migrate import LocalCluster
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun
from dpmigrate.runtime.stagehost import ring_name


def _readable_memory(pid: int) -> bytes:
    """Every readable private mapping of ``pid`` (heap, stack, anonymous), concatenated."""
    out = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("r") or (len(fields) > 5 and fields[5].startswith("/")):
                continue  # unreadable, or a file's pages (the interpreter, libraries)
            if len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]", "[vvar_vclock]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(start)
                out.append(mem.read(end - start))
            except (OSError, ValueError, OverflowError):
                continue
    return b"".join(out)


def _forged_hello(ring: str, generation: int, next_expected: int) -> bytes:
    """The probe's hijack: a protocol-1 HELLO with a large generation, in-window position."""
    payload = struct.pack("!Q", generation) + ring.encode()
    return b"DR\x01\x01" + struct.pack("!QI", next_expected, len(payload)) + payload


def test_the_token_stays_out_of_stages_and_strangers_at_ring_ports_change_nothing(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    app = App.load(paced_flows(tmp_path, 60000, rate=6000))
    expected = reference_checker(app)
    with LocalCluster(3) as cluster:
        token = cluster.token.encode()
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 3000, name="check")
            stages = run.status()
            # -- the credential: not in any stage's environment, not in its memory
            for info in stages:
                pid = int(info["pid"])
                environ = Path(f"/proc/{pid}/environ").read_bytes()
                assert environ, info["name"]  # the fault could be seen: we read it
                assert b"DPMIGRATE_TOKEN" not in environ and token not in environ, info["name"]
                assert b"DPMIGRATE_STAGE_KEY=" in environ, info["name"]
                memory = _readable_memory(pid)
                assert len(memory) > 1 << 20, info["name"]  # we did read its heap
                assert token not in memory, f"the cluster token is in {info['name']}'s memory"
            # -- nor in a checkpoint's CRIU images (the stage goes on running)
            bundle = tmp_path / "table.bundle"
            cluster.checkpoint("table", bundle, leave_running=True)
            images = [p for p in bundle.rglob("*.img") if p.is_file()]
            assert any(p.name.startswith("pages-") for p in images), images  # its memory
            assert not [p.name for p in images if token in p.read_bytes()]
            # -- files: logs and snapshots of the nodes not readable by others
            files = [p for p in Path(cluster_state_dir).rglob("*")
                     if p.is_file() and not p.is_symlink()]  # fmt: skip
            logs = [p for p in files if p.suffix == ".log" and "logs" in p.parts]
            assert len(logs) >= len(stages), [str(p) for p in files]  # the stages' own logs
            secret = [p for p in files if p.suffix in (".log", ".bin")
                      or p.name == "snapshot" or "journal" in p.name]  # fmt: skip
            assert any(p.name == "snapshot" for p in secret), [str(p) for p in files]
            readable = [str(p) for p in secret if p.stat().st_mode & 0o044]
            assert readable == [], readable
            # -- strangers at every ring's producer, from node3's namespace
            stranger_ns = cluster.node("node3").agent_pid
            assert stranger_ns is not None
            with cluster.client("node1") as agent:
                endpoints = {
                    ring_name(app, r): agent.call("lookup", ring=ring_name(app, r), timeout=5)
                    for r in app.rings
                }
            assert all(e and e["transport"] == "tcp" for e in endpoints.values()), endpoints

            def attack() -> dict[str, list[bytes]]:
                answers: dict[str, list[bytes]] = {}
                for name, endpoint in endpoints.items():
                    host, _, port = endpoint["address"].rpartition(":")
                    got = answers[name] = []
                    idle = []
                    for i in range(60):
                        s = socket.create_connection((host, int(port)), timeout=5)
                        if i % 3 == 0:
                            s.sendall(_forged_hello(name, 10**9 + i, 0))
                        elif i % 3 == 1:
                            s.sendall(os.urandom(512))
                        idle.append(s)
                    for s in idle:
                        s.settimeout(3)
                        try:
                            got.append(s.recv(4096))
                        except OSError:
                            got.append(b"")
                        s.close()
                return answers

            answers = in_netns(stranger_ns, attack)
            assert sum(len(a) for a in answers.values()) == 60 * len(endpoints)  # they connected
            for name, replies in answers.items():
                for reply in replies:
                    assert name.encode() not in reply, (name, reply)  # the ring is not named
            assert run.wait(duration=120), run.status()
        finally:
            run.stop()
        final = {s["name"]: s for s in run.status()}
        assert all(s.get("restarts", 0) == 0 for s in final.values()), final
        assert checker_of(list(final.values())) == {
            "received": 60000, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


def test_the_store_answers_only_a_client_with_the_clusters_certificate(
    cluster_state_dir: Path,
) -> None:
    """etcd can change every placement: the embedded member requires a client certificate
    of the cluster's own CA (made by `cluster up`), which a stage's environment does not
    even name."""
    import requests

    with LocalCluster(1) as cluster:
        entry = cluster._require_record()["etcd"]
        url, tls = entry["endpoints"], entry["tls"]
        assert url.startswith("https://")
        for path in (tls["ca"], tls["cert"], tls["key"], str(Path(tls["ca"]).parent)):
            assert Path(path).stat().st_mode & 0o077 == 0, path
        body = json.dumps({"key": base64.b64encode(b"/dpmigrate/").decode(),
                           "range_end": base64.b64encode(b"/dpmigrate0").decode()})  # fmt: skip
        plain = url.replace("https://", "http://")
        agent_pid = cluster.node("node1").agent_pid
        assert agent_pid is not None

        def ask(target: str, **kw: object) -> str:
            try:
                resp = requests.post(f"{target}/v3/kv/range", data=body, timeout=5, **kw)
            except requests.RequestException as err:
                return type(err).__name__
            return f"HTTP {resp.status_code} {len(resp.content)}"

        def attempts() -> dict[str, str]:
            return {
                "no certificate": ask(url, verify=tls["ca"]),
                "plain http": ask(plain),
                "the cluster's": ask(url, verify=tls["ca"], cert=(tls["cert"], tls["key"])),
            }

        got = in_netns(agent_pid, attempts)  # from a node, where stages run
        assert got["the cluster's"].startswith("HTTP 200"), got  # the check can succeed
        assert not got["no certificate"].startswith("HTTP 200"), got
        assert not got["plain http"].startswith("HTTP 200"), got

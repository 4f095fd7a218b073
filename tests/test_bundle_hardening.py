"""Hardened bundles and app manifests: each finding of the probe reproduced, then refused.

Every test first checks that its fault is really in place (the link exists, the mode is 777,
the owner is another uid), then that verify, load, inspect and restore refuse it with one line
that names the file or field and says what to do — and that the CLI exits non-zero. Bundles
are sealed without CRIU (as in test_bundle_manifest.py): nothing here needs a dump.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from support import (
    checker_of,
    paced_flows,
    reference_checker,
    require,
    run_cli,
    stage_status,
    wait_for_input,
)

from dpmigrate.checkpoint import bundle, cold
from dpmigrate.checkpoint.inspect import inspect
from dpmigrate.errors import BundleError, ConfigError, RemoteError
from dpmigrate.runtime import journal as journal_mod
from dpmigrate.runtime.cluster import LocalCluster
from dpmigrate.runtime.journal import StageJournal
from dpmigrate.runtime.manifest import App
from dpmigrate.runtime.multinode import MultiNodeRun
from dpmigrate.statesync.state import State

HOST = bundle.HostFacts("4.2.1", ("fpu", "sse2"), "6.18.0", "x86_64")
#: Facts any node with a working CRIU satisfies: what a bundle checked by the CLI is sealed
#: with (the CLI verifies against this machine).
ANY_HOST = bundle.HostFacts(None, (), platform.release(), platform.machine())
#: A node that can restore such a bundle (the API tests pass it instead of running criu).
HERE = bundle.HostFacts("99.0", (), platform.release(), platform.machine())
NOBODY = 65534
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"


def _sealed(tmp_path: Path, host: bundle.HostFacts = HOST) -> Path:
    root = tmp_path / "b"
    images = root / bundle.IMAGES
    images.mkdir(parents=True)
    (images / "inventory.img").write_bytes(b"inventory" * 10)
    (images / "core-1.img").write_bytes(bytes(range(256)) * 4)
    bundle.seal(root, 42, dump={"frozen_time": 1}, state=b"the state", rings={"in": 1},
                node="node1", host=host)  # fmt: skip
    assert bundle.verify(root, host=HERE if host is ANY_HOST else host).ok
    return root


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / bundle.MANIFEST).read_text())


def _rewrite(root: Path, manifest: dict[str, Any]) -> None:
    (root / bundle.MANIFEST).write_text(json.dumps(manifest))


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def _refused(call: Any) -> str:
    with pytest.raises(BundleError) as refused:
        call()
    return _one_line(str(refused.value))


# --------------------------------------------------------------------------- links, special files


def test_a_state_linked_to_a_secret_with_a_matching_manifest_is_refused(tmp_path: Path) -> None:
    root = _sealed(tmp_path)
    secret = tmp_path / "shadow"  # stands for /etc/shadow: a file the bundle must not reach
    secret.write_bytes(b"root:$6$secret-hash:19000::::::\n")
    os.chmod(secret, 0o600)
    (root / bundle.STATE).unlink()
    os.symlink(secret, root / bundle.STATE)
    manifest = _manifest(root)
    data = secret.read_bytes()
    manifest["files"][bundle.STATE] = {
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    _rewrite(root, manifest)
    assert (root / bundle.STATE).is_symlink()  # the fault is in place
    assert (root / bundle.STATE).read_bytes() == data  # and the manifest matches what it reaches

    report = bundle.verify(root, host=HOST)
    assert [(p.file, p.kind) for p in report.problems] == [(bundle.STATE, "unsafe")]
    assert "a symbolic link, refused" in report.problems[0].problem
    line = _refused(lambda: bundle.load(root, host=HOST))
    assert "state.bin: a symbolic link, refused" in line and "Nothing was restored" in line
    line = _refused(lambda: bundle.restore(root))
    assert "state.bin: a symbolic link" in line
    data_seen = inspect(root)
    assert data_seen["state"] is None  # never read as state
    assert not data_seen["verify"]["ok"]
    assert any(e["file"] == bundle.STATE and "symbolic link" in e["problem"]
               for e in data_seen["errors"])  # fmt: skip

    done = run_cli("verify", str(root))
    assert done.returncode == 1 and "ok (" not in done.stdout
    assert f"{root}: state.bin: a symbolic link, refused" in done.stdout
    done = run_cli("inspect", str(root))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT valid" in done.stdout and "state:" not in done.stdout
    assert run_cli("inspect", "--json", str(root)).returncode == 1
    done = run_cli("restore", str(root))
    assert done.returncode == 1
    assert "state.bin: a symbolic link" in _one_line(done.stderr)


def test_a_symlinked_images_folder_is_refused_when_read(tmp_path: Path) -> None:
    root = _sealed(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    os.rename(root / bundle.IMAGES, elsewhere)
    os.symlink(elsewhere, root / bundle.IMAGES)
    assert (root / bundle.IMAGES).is_symlink() and (root / "images/core-1.img").is_file()

    report = bundle.verify(root, host=HOST)
    assert ("images", "unsafe") in [(p.file, p.kind) for p in report.problems], report.problems
    assert not report.ok
    manifest = _manifest(root)
    line = _refused(lambda: bundle.read_part(root, manifest, "images/core-1.img", 0, 10))
    assert "images: a symbolic link" in line
    dest = tmp_path / "dest"
    (dest).mkdir(mode=0o700)
    os.symlink(elsewhere, dest / bundle.IMAGES)  # a receive must not write through it either
    before = sorted(p.name for p in elsewhere.iterdir())
    with pytest.raises(BundleError, match="symbolic link"):
        bundle.receive(dest, manifest, lambda n, o, s: (b"", 0), host=HOST)
    assert sorted(p.name for p in elsewhere.iterdir()) == before


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_a_special_file_is_refused_without_blocking(tmp_path: Path, kind: str) -> None:
    root = _sealed(tmp_path)
    target = root / "images/core-1.img"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target, 0o600)
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
    else:
        server = socket.socket(socket.AF_UNIX)
        server.bind(str(target))
        assert stat.S_ISSOCK(os.lstat(target).st_mode)
    try:
        report = bundle.verify(root, host=HOST)  # opening a FIFO for reading would block
        assert [(p.file, p.kind) for p in report.problems] == [("images/core-1.img", "unsafe")]
        assert f"a {'FIFO' if kind == 'fifo' else 'socket'}, refused" in str(report.problems[0])
        line = _refused(lambda: bundle.read_part(root, _manifest(root), "images/core-1.img", 0, 1))
        assert "images/core-1.img" in line
        (root / bundle.MANIFEST).unlink()
        with pytest.raises(BundleError, match="cannot seal"):  # nor vouched for by a seal
            bundle.seal(root, 1, dump={}, host=HOST)
    finally:
        if kind == "socket":
            server.close()


# --------------------------------------------------------------------------- manifest fields


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu_flags", [["fpu"]]),
        ("criu_version", 42),
        ("root_pid", "42"),
        ("root_pid", True),
        ("arch", {"x": 1}),
        ("node", "node1\nnode2"),
        ("stage", "../etc"),
        ("sizes", [1, 2]),
        ("dump", {"frozen_time": "slow"}),
        ("streamed", "images/pages-*.img"),
        ("leave_running", "yes"),
        ("files", []),
    ],
)
def test_a_manifest_field_of_the_wrong_type_is_one_line_naming_it(
    tmp_path: Path, field: str, value: Any
) -> None:
    root = _sealed(tmp_path)
    _rewrite(root, {**_manifest(root), field: value})
    assert _manifest(root)[field] == value  # the fault is in place
    report = bundle.verify(root, host=HOST)
    assert [(p.file, p.kind) for p in report.problems] == [(bundle.MANIFEST, "manifest")]
    assert f"field {field!r} must be" in report.problems[0].problem
    assert f"field {field!r}" in _refused(lambda: bundle.load(root, host=HOST))
    data = inspect(root)
    assert not data["verify"]["ok"] and data["manifest"]["root_pid"] is None


@pytest.mark.parametrize(
    "entry",
    [{"size": "9", "sha256": "0" * 64}, {"size": 9}, {"size": -1, "sha256": "0" * 64},
     {"size": 9, "sha256": "not hex"}, "9", None],
)  # fmt: skip
def test_a_malformed_file_entry_is_one_line(tmp_path: Path, entry: Any) -> None:
    root = _sealed(tmp_path)
    manifest = _manifest(root)
    manifest["files"][bundle.STATE] = entry
    _rewrite(root, manifest)
    report = bundle.verify(root, host=HOST)
    assert [p.kind for p in report.problems] == ["manifest"]
    assert "'files' entry 'state.bin'" in report.problems[0].problem


def test_the_cli_says_one_line_for_a_wrong_type(tmp_path: Path) -> None:
    root = _sealed(tmp_path)
    _rewrite(root, {**_manifest(root), "cpu_flags": [["fpu"]]})  # a TypeError before
    for command in ("verify", "inspect", "restore"):
        done = run_cli(command, str(root))
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        text = done.stdout if command == "verify" else done.stderr or done.stdout
        assert "field 'cpu_flags' must be a list of strings" in text, (command, text)
    assert "field 'cpu_flags'" in _one_line(run_cli("restore", str(root)).stderr)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"format": "dpmigrate-bundle", "x": "\xff\xfe"}', "not UTF-8"),
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, "nested too deeply"),
        (b'{"format_version": 1' + b"0" * 5000 + b"}", "not JSON"),
    ],
)
def test_a_deep_or_non_utf8_manifest_is_one_line(
    tmp_path: Path, content: bytes, phrase: str
) -> None:
    root = _sealed(tmp_path)
    (root / bundle.MANIFEST).write_bytes(content)
    report = bundle.verify(root, host=HOST)
    assert [(p.file, p.kind) for p in report.problems] == [(bundle.MANIFEST, "manifest")]
    assert phrase in report.problems[0].problem
    assert phrase in _refused(lambda: bundle.load(root, host=HOST))
    assert phrase in _refused(lambda: bundle.decode_manifest(content))
    assert any(phrase in e["problem"] for e in inspect(root)["errors"])
    if phrase == "nested too deeply":
        done = run_cli("verify", str(root))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert phrase in _one_line(done.stdout)


# --------------------------------------------------------------------------- owner and mode


def test_another_users_bundle_is_refused_unless_trusted(tmp_path: Path) -> None:
    require("root")
    root = _sealed(tmp_path, ANY_HOST)
    for folder, _dirs, names in os.walk(root):
        os.chown(folder, NOBODY, NOBODY)
        for name in names:
            os.chown(os.path.join(folder, name), NOBODY, NOBODY)
    assert os.stat(root).st_uid == NOBODY != os.geteuid()  # the fault is in place

    report = bundle.verify(root, host=HERE)
    assert [(p.file, p.kind) for p in report.problems] == [("(owner)", "untrusted")]
    why = report.problems[0].problem
    assert f"owned by uid {NOBODY}" in why and f"not by you (uid {os.geteuid()}" in why
    assert "--trust-owner" in why and f"chown -R {os.geteuid()}" in why
    for call in (lambda: bundle.load(root, host=HERE), lambda: bundle.restore(root),
                 lambda: inspect(root)):  # fmt: skip
        assert f"owned by uid {NOBODY}" in _refused(call)
    assert bundle.verify(root, host=HERE, trust_owner=True).ok
    assert bundle.load(root, host=HERE, trust_owner=True).state == b"the state"
    assert inspect(root, trust_owner=True)["state"] == {"bytes": 9, "decodes": False}

    for command in ("verify", "inspect", "restore"):
        done = run_cli(command, str(root))
        assert done.returncode == 1, (command, done.stdout, done.stderr)
        text = done.stdout if command == "verify" else done.stderr
        assert f"owned by uid {NOBODY}" in _one_line(text), (command, text)
    trusted = run_cli("verify", "--trust-owner", str(root))
    assert "(owner)" not in trusted.stdout, trusted.stdout
    assert trusted.returncode == (0 if bundle.HostFacts.local().criu_version else 1)


def test_a_world_writable_bundle_is_refused_unless_trusted(tmp_path: Path) -> None:
    root = _sealed(tmp_path, ANY_HOST)
    os.chmod(root, 0o777)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o777  # the fault is in place
    report = bundle.verify(root, host=HERE)
    assert [(p.file, p.kind) for p in report.problems] == [("(mode)", "untrusted")]
    assert "writable by group or others (mode 0777)" in report.problems[0].problem
    assert "chmod -R go-w" in report.problems[0].problem
    assert "mode 0777" in _refused(lambda: bundle.restore(root))
    assert "mode 0777" in _refused(lambda: inspect(root))
    assert bundle.verify(root, host=HERE, trust_owner=True).ok
    os.chmod(root, 0o700)
    os.chmod(root / bundle.STATE, 0o666)
    assert "state.bin is writable by group or others (mode 0666)" in str(
        bundle.verify(root, host=HERE).problems[0]
    )
    done = run_cli("restore", "--cold", str(root))
    assert done.returncode == 1 and "mode 0666" in _one_line(done.stderr)


def _chown_all(root: Path, uid: int) -> None:
    for folder, _dirs, names in os.walk(root):
        os.chown(folder, uid, uid)
        for name in names:
            os.chown(os.path.join(folder, name), uid, uid)


def test_a_stage_bundle_of_another_user_through_the_cluster(
    cluster_state_dir: Path, tmp_path: Path
) -> None:
    """`restore BUNDLE --node` of a stage bundle chowned to another uid: refused in one line by
    the CLI, and by the node's agent when asked directly (CRIU and cold: it loads the bundle
    again, so the flag must reach it); with --trust-owner it restores, and the run is clean."""
    app = App.load(paced_flows(tmp_path, 40000))
    expected = reference_checker(app)
    env = {"DPMIGRATE_STATE_DIR": str(cluster_state_dir)}
    with LocalCluster(3) as cluster:
        run = MultiNodeRun(app, cluster)
        run.start()
        try:
            wait_for_input(run, 6000)
            out = tmp_path / "table.bundle"
            made = cluster.checkpoint("table", out)  # without --leave-running: it ends here
            assert not stage_status(run), "the checkpointed stage still shows as running"
            _chown_all(out, NOBODY)
            owners = {p.lstat().st_uid for p in [out, *out.rglob("*")]}
            assert owners == {NOBODY} and os.geteuid() != NOBODY  # the fault is in place
            placed = cluster.store().placement("flows", "table")

            done = run_cli("restore", str(out), "--node", "node1", env=env, timeout=120)
            assert done.returncode == 1, done.stdout + done.stderr
            line = _one_line(done.stderr)
            assert f"owned by uid {NOBODY}" in line and "--trust-owner" in line, line
            with cluster.client("node1", timeout=120) as agent:
                for op, extra in (("restore_stage", {"wake": True}), ("cold_restore_stage", {})):
                    with pytest.raises(RemoteError) as refused:
                        agent.call(op, bundle=str(out), **extra)
                    assert f"owned by uid {NOBODY}" in _one_line(str(refused.value)), op
            assert cluster.store().placement("flows", "table") == placed
            assert not stage_status(run), "a refused restore started something"

            restored = run_cli("restore", str(out), "--node", "node1", "--trust-owner",
                               "--json", env=env, timeout=120)  # fmt: skip
            assert restored.returncode == 0, restored.stderr
            info = json.loads(restored.stdout)
            assert info["node"] == "node1" and info["state_version"] == made["state_version"]
            assert {p.lstat().st_uid for p in [out, *out.rglob("*")]} == {NOBODY}  # unchanged
            assert run.wait(duration=90), run.status()
        finally:
            run.stop()
        stages = {s["name"]: s for s in run.status()}
        assert stages["table"]["node"] == "node1" and stages["table"]["restarts"] == 0
        assert checker_of(list(stages.values())) == {
            "received": 40000, "lost": 0, "duplicated": 0, "digest": expected["digest"],
        }  # fmt: skip
        run.cleanup()


# --------------------------------------------------------------------------- cold restore


def _stage_bundle(tmp_path: Path) -> Path:
    """A stage bundle a cold restore accepts (sealed without CRIU): state, positions, stage."""
    root = tmp_path / "stage.bundle"
    (root / bundle.IMAGES).mkdir(parents=True)
    (root / bundle.IMAGES / "core-1.img").write_bytes(b"\0" * 64)
    state = State({"flows": 3}, version=2)
    context = {
        "app": "flows", "stage": "table", "manifest": "/m.toml", "run_dir": "/r",
        "model": "multi-node", "positions": {"inputs": {"in": 5}, "outputs": {"out": 5}},
        "state_version": state.version, "state_digest": state.digest(),
    }  # fmt: skip
    bundle.seal(root, 42, dump={"frozen_time": 1}, state=state.snapshot(), rings=context,
                stage="flows/table", node="node1", host=HOST)  # fmt: skip
    assert cold.read(root).state.digest() == state.digest()  # the base case is restorable
    return root


def _cold_refused(root: Path, phrase: str) -> None:
    """cold.read and `restore --cold` (which reads it before asking any cluster) refuse it in
    one line holding ``phrase``; the bundle is as it was."""
    before = sorted((str(p), p.lstat().st_mode, p.lstat().st_size) for p in root.rglob("*"))
    line = _refused(lambda: cold.read(root))
    assert phrase in line and "refused" in line and "Nothing was restored" in line, line
    done = run_cli("restore", "--cold", "--node", "node1", str(root))
    assert done.returncode == 1, done.stdout + done.stderr
    assert phrase in _one_line(done.stderr), done.stderr
    assert sorted((str(p), p.lstat().st_mode, p.lstat().st_size) for p in root.rglob("*")) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("cpu_flags", [["fpu"]]),
        ("root_pid", "42"),
        ("stage", "../etc"),
        ("node", "node1\nnode2"),
        ("dump", {"frozen_time": "slow"}),
        ("streamed", "images/pages-*.img"),
    ],
)
def test_a_cold_restore_refuses_a_wrong_typed_field_in_one_line(
    tmp_path: Path, field: str, value: Any
) -> None:
    root = _stage_bundle(tmp_path)
    _rewrite(root, {**_manifest(root), field: value})
    assert _manifest(root)[field] == value  # the fault is in place
    _cold_refused(root, f"manifest.json: field {field!r} must be")


def test_a_cold_restore_refuses_a_malformed_state_entry(tmp_path: Path) -> None:
    root = _stage_bundle(tmp_path)
    manifest = _manifest(root)
    manifest["files"][bundle.STATE]["size"] = "9"
    _rewrite(root, manifest)
    _cold_refused(root, "field 'files' entry 'state.bin' must be an object")


def test_a_cold_restore_refuses_a_symlinked_state_with_a_matching_manifest(
    tmp_path: Path,
) -> None:
    root = _stage_bundle(tmp_path)
    secret = tmp_path / "elsewhere.bin"  # a file outside the bundle, holding a valid snapshot
    os.rename(root / bundle.STATE, secret)
    os.symlink(secret, root / bundle.STATE)
    data = (root / bundle.STATE).read_bytes()
    manifest = _manifest(root)
    assert manifest["files"][bundle.STATE]["sha256"] == hashlib.sha256(data).hexdigest()
    assert (root / bundle.STATE).is_symlink()  # the fault is in place; the manifest matches
    _cold_refused(root, "state.bin: a symbolic link, refused")


@pytest.mark.parametrize("fault", ["images-link", "fifo"])
def test_a_cold_restore_refuses_a_link_or_special_file_anywhere(tmp_path: Path, fault: str) -> None:
    """The images are not used by a cold restore, but a bundle holding a link or a special
    file is not one dpmigrate wrote: refused there as verify refuses it (without blocking)."""
    root = _stage_bundle(tmp_path)
    if fault == "images-link":
        os.rename(root / bundle.IMAGES, tmp_path / "images-elsewhere")
        os.symlink(tmp_path / "images-elsewhere", root / bundle.IMAGES)
        assert (root / bundle.IMAGES).is_symlink()
        phrase = "images: a symbolic link, refused"
    else:
        target = root / bundle.IMAGES / "core-1.img"
        target.unlink()
        os.mkfifo(target, 0o600)
        assert stat.S_ISFIFO(os.lstat(target).st_mode)
        phrase = "images/core-1.img: a FIFO, refused"
    _cold_refused(root, phrase)


def test_a_cold_restore_refuses_another_users_or_a_writable_bundle_unless_trusted(
    tmp_path: Path,
) -> None:
    root = _stage_bundle(tmp_path)
    os.chmod(root / bundle.RINGS, 0o666)
    assert stat.S_IMODE(os.stat(root / bundle.RINGS).st_mode) == 0o666  # the fault is in place
    _cold_refused(root, "rings.json is writable by group or others (mode 0666)")
    assert cold.read(root, trust_owner=True).key == "flows/table"
    os.chmod(root / bundle.RINGS, 0o600)
    if os.geteuid() != 0:
        return
    _chown_all(root, NOBODY)
    assert os.stat(root).st_uid == NOBODY  # the fault is in place
    _cold_refused(root, f"owned by uid {NOBODY}")
    assert cold.read(root, trust_owner=True).key == "flows/table"


# --------------------------------------------------------------------------- modes we write


def test_sealed_bundles_are_private(tmp_path: Path) -> None:
    root = _sealed(tmp_path)
    modes = {
        str(path.relative_to(root)): stat.S_IMODE(path.stat().st_mode)
        for path in [root, *root.rglob("*")]
    }
    assert modes["."] == 0o700 and modes["images"] == 0o700, modes
    assert {m for name, m in modes.items() if name not in (".", "images")} == {0o600}, modes


def test_stage_snapshots_are_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_mod, "COMPACT_EVERY", 1)
    folder = tmp_path / "stages" / "table"
    journal = StageJournal(folder)
    state = State({"k": 1})
    journal.append([], {"in": 1}, {}, State({"k": 1}, version=1))  # compacts: a snapshot
    journal.close()
    snapshot = folder / "snapshot"
    assert snapshot.exists()  # the compaction really wrote one
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "journal").stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    os.chmod(snapshot, 0o644)  # as an older dpmigrate left it
    os.chmod(folder, 0o755)
    StageJournal(folder).start_at(state, {}, {})
    assert stat.S_IMODE(snapshot.stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


# --------------------------------------------------------------------------- app manifests


def _app(tmp_path: Path, text: str | bytes) -> Path:
    (tmp_path / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
    path = tmp_path / "app.toml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


GOOD = """
[app]
name = "t"
[stages.gen]
entry = "stages:Generator"
[stages.table]
entry = "stages:FlowTable"
[[rings]]
from = "gen.out"
to = "table.in"
"""


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),
        ("a = " + "{b = " * 5000 + "1" + "}" * 5000, "nested too deeply"),
        (b'[app]\nname = "\xff"\n', "not UTF-8 (line 2)"),
        ("[app\n", "not valid TOML"),
        ("a = 1" + "0" * 5000, "not valid TOML"),
        (GOOD.replace('name = "t"', 'name = "t\\n"'), "is not an app name"),
        (GOOD.replace("[stages.gen]", '[stages."gen\\n"]'), "stage names are"),
        (GOOD.replace('"gen.out"', '"gen.out\\n"'), "must look like 'stage.port'"),
        (GOOD.replace('"gen.out"', '"gen.a.b"'), "must look like 'stage.port'"),
        (GOOD + 'name = "../x"\n', "is not a ring name"),
        (GOOD.replace('entry = "stages:Generator"', 'entry = "..x:Y"'), "must look like"),
        (
            GOOD.replace(
                'entry = "stages:Generator"', 'entry = "stages:Generator"\nnode = "n1\\n"'
            ),
            "is not a node name",
        ),
        (
            GOOD.replace(
                'entry = "stages:Generator"',
                'entry = "stages:Generator"\nconfig = { when = 1979-05-27 }',
            ),
            "is a date",
        ),
        (
            GOOD.replace('to = "table.in"', 'to = "table.in"\ncapacity = 9' + "9" * 30),
            "up to",
        ),
        (
            GOOD.replace('to = "table.in"', 'to = "table.in"\ntransport = ["shm"]'),
            "must be a string",
        ),
    ],
)
def test_an_app_manifest_problem_is_one_config_error_line(
    tmp_path: Path, text: str | bytes, phrase: str
) -> None:
    path = _app(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        App.load(path)
    assert phrase in _one_line(str(caught.value)), caught.value
    assert str(path) in str(caught.value)


def test_a_folder_or_unreadable_app_manifest_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        App.load(tmp_path)
    App.load(_app(tmp_path, GOOD))  # the base case of the table above is valid

"""Fuzz every decoder of a file a user hands us: a bundle's ``manifest.json`` and an app's TOML.

Whatever the bytes, the only outcome besides success is the documented error — BundleError
(or a failed VerifyReport) for a bundle, ConfigError for an app manifest — in one line; never
another exception, never a hang (sizes and nesting are bounded), and nothing opened outside
the test's own folder (every ``os.open`` is recorded and checked). Cases per decoder:
``tests/fuzzing.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fuzzing import fuzz
from hypothesis import given
from hypothesis import strategies as st

from dpmigrate.checkpoint import bundle
from dpmigrate.errors import BundleError, ConfigError
from dpmigrate.runtime.manifest import App

HOST = bundle.HostFacts("4.2.1", ("fpu", "sse2"), "6.18.0", "x86_64")
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flows" / "app.toml"

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=8,
)  # fmt: skip

#: Byte edits of a valid file: (where, byte, how); where is taken modulo the file's length.
EDITS = st.lists(
    st.tuples(st.integers(0, 1 << 16), st.integers(0, 255), st.sampled_from("sid")), max_size=6
)


def _edited(data: bytes, edits: list[tuple[int, int, str]]) -> bytes:
    out = bytearray(data)
    for where, byte, how in edits:
        at = where % (len(out) + 1)
        if how == "s" and at < len(out):
            out[at] = byte
        elif how == "i":
            out.insert(at, byte)
        elif at < len(out):
            del out[at]
    return bytes(out)


#: The recorders of the test that runs (the audit hook below is inert when this is empty).
_RECORDING: list[list[tuple[Any, Any]]] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _RECORDING:
        _RECORDING[-1].append((args[0], args[1] if len(args) > 1 else None, args[2]))


sys.addaudithook(_audit)  # hooks cannot be removed; this one only appends while recording


@contextlib.contextmanager
def _watched(folder: Path | None) -> Iterator[None]:
    """Record every file opened inside the block — builtins ``open``, ``os.open`` with or
    without a ``dir_fd``, whoever calls it (a PEP 578 audit hook) — then check that each was
    inside ``folder`` (None: that nothing was opened). Only the decoder's call is watched,
    not hypothesis's own bookkeeping."""
    calls: list[tuple[Any, Any]] = []
    _RECORDING.append(calls)
    try:
        yield
    finally:
        _RECORDING.remove(calls)
    if folder is None:
        assert not calls, calls
    else:
        _inside(calls, folder)


_WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(calls: list[tuple[Any, ...]], folder: Path) -> None:
    """Nothing outside ``folder`` was opened — but for Python reading its own modules (an
    entry point names one), and never for writing. A plain name without a folder is one the
    bundle code opens relative to a descriptor of a folder below ``folder``."""
    for path, mode, flags in calls:
        if isinstance(path, int):
            continue  # os.fdopen of a descriptor opened (and checked) before
        name = os.fsdecode(path)
        if "/" not in name:
            assert name not in ("", ".", ".."), name
            continue
        full = os.path.abspath(name)
        if full == str(folder) or full.startswith(f"{folder}{os.sep}"):
            continue
        writes = bool((flags or 0) & _WRITES) or any(c in (mode or "") for c in "wax+")
        assert not writes and full.endswith((".py", ".pyc", ".so")), (name, mode, flags)


def _one_line(message: str) -> None:
    assert message and "\n" not in message and "\r" not in message, message


# --------------------------------------------------------------------------- bundle manifests


def _bundle(folder: Path) -> tuple[Path, dict[str, Any], bytes]:
    root = folder / "b"
    (root / bundle.IMAGES).mkdir(parents=True)
    (root / bundle.IMAGES / "core-1.img").write_bytes(b"core" * 64)
    (root / bundle.IMAGES / "pages-1.img").write_bytes(b"\0" * 512)
    manifest = bundle.seal(root, 7, dump={"frozen_time": 3, "criu_run_id": "x"},
                           state=b"state", rings={"in": 1}, stage="flows/table", node="node2",
                           host=HOST)  # fmt: skip
    return root, manifest, (root / bundle.MANIFEST).read_bytes()


def _decode(data: bytes) -> None:
    try:
        with _watched(None):  # decoding bytes opens nothing
            manifest = bundle.decode_manifest(data, "fuzzed")
    except BundleError as err:
        _one_line(str(err))
    else:
        assert isinstance(manifest, dict) and isinstance(manifest["files"], dict)


def _verify_and_load(root: Path, data: bytes) -> None:
    (root / bundle.MANIFEST).write_bytes(data)
    with _watched(root.parent):
        report = bundle.verify(root, host=HOST)
    for problem in report.problems:
        _one_line(str(problem))
    if report.ok:  # a refused one is refused by load the same way (test_bundle_hardening)
        with _watched(root.parent):
            loaded = bundle.load(root, host=HOST)
        assert loaded.root_pid >= 1 and loaded.state == b"state"


def test_manifest_decoder_takes_arbitrary_bytes() -> None:
    @fuzz
    @given(st.binary(max_size=512))
    def case(data: bytes) -> None:
        _decode(data)

    case()


def test_manifest_decoder_takes_arbitrary_json() -> None:
    @fuzz
    @given(JSON, st.booleans())
    def case(value: Any, framed: bool) -> None:
        if framed and isinstance(value, dict):  # past the format check, into the fields
            value = {**value, "format": bundle.FORMAT, "format_version": bundle.FORMAT_VERSION}
        _decode(json.dumps(value).encode())

    case()


def test_verify_and_load_take_mutated_manifests() -> None:
    with tempfile.TemporaryDirectory(prefix="dpm-fuzz-") as tmp:
        folder = Path(tmp).resolve()
        root, manifest, _ = _bundle(folder)
        names = sorted(manifest["files"])

        @fuzz
        @given(
            st.lists(
                st.tuples(st.sampled_from([*sorted(manifest), *[f"files/{n}" for n in names]]),
                          st.one_of(st.just("delete"), JSON)),
                min_size=1, max_size=3,
            ),
        )  # fmt: skip
        def case(changes: list[tuple[str, Any]]) -> None:
            changed = json.loads(json.dumps(manifest))
            for key, value in changes:
                where, name = (
                    (changed.get("files"), key[6:]) if key.startswith("files/") else (changed, key)
                )
                if not isinstance(where, dict):
                    continue
                if value == "delete":
                    where.pop(name, None)
                else:
                    where[name] = value
            _verify_and_load(root, json.dumps(changed).encode())

        case()


def test_verify_and_load_take_byte_edited_manifests() -> None:
    with tempfile.TemporaryDirectory(prefix="dpm-fuzz-") as tmp:
        folder = Path(tmp).resolve()
        root, _, valid = _bundle(folder)

        @fuzz
        @given(EDITS)
        def case(edits: list[tuple[int, int, str]]) -> None:
            _verify_and_load(root, _edited(valid, edits))

        case()


# --------------------------------------------------------------------------- app manifests

GOOD = """
[app]
name = "t"

[defaults]
capacity = 64
batch = 8

[stages.gen]
entry = "stages:Generator"
node = "node1"
config = { sources = 2, total = 10 }

[stages.table]
entry = "stages:FlowTable"
node = "node2"
standby = "node3"

[[rings]]
from = "gen.out"
to = "table.in"
transport = "auto"
"""

#: Tokens a careless edit of a manifest produces: quotes, brackets, dots, newlines, dates.
TOKENS = st.sampled_from(['"', "'", "[", "]", "{", "}", ".", "=", "\n", ",", "-", "1979-05-27",
                          "\\", "\x00", "é", "\udcff", "inf", "nan", "0x", "true", "#"])  # fmt: skip


def _load_app(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    try:
        with _watched(path.parent):
            app = App.load(path)
    except ConfigError as err:
        _one_line(str(err))
    else:
        assert app.stages and all(s.name for s in app.stages)


@pytest.fixture
def app_folder() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="dpm-fuzz-") as tmp:
        folder = Path(tmp).resolve()
        (folder / "stages.py").write_text((EXAMPLE.parent / "stages.py").read_text())
        yield folder


def test_app_loader_takes_arbitrary_text_and_bytes(app_folder: Path) -> None:
    path = app_folder / "app.toml"

    @fuzz
    @given(st.one_of(st.binary(max_size=400), st.text(max_size=400).map(
        lambda t: t.encode("utf-8", "surrogatepass"))))  # fmt: skip
    def case(data: bytes) -> None:
        _load_app(path, data)

    case()


def test_app_loader_takes_mutated_manifests(app_folder: Path) -> None:
    path = app_folder / "app.toml"
    valid = GOOD.encode()
    _load_app(path, valid)  # the base case loads

    @fuzz
    @given(EDITS, st.lists(st.tuples(st.integers(0, len(GOOD)), TOKENS), max_size=4))
    def case(edits: list[tuple[int, int, str]], inserts: list[tuple[int, str]]) -> None:
        text = GOOD
        for at, token in inserts:
            text = text[:at] + token + text[at:]
        _load_app(path, _edited(text.encode("utf-8", "surrogatepass"), edits))

    case()

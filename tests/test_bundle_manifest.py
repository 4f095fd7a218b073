"""The bundle manifest without CRIU or root: seal a folder, verify it, serve and receive it the
way a migration moves it between agents — and refuse a wrong size, a wrong sha256, an unlisted
file and a name that leaves the folder, each with one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpmigrate.checkpoint import bundle
from dpmigrate.errors import BundleError

HOST = bundle.HostFacts("4.2.1", ("fpu", "sse2"), "6.18.0", "x86_64")
CONTEXT = {"app": "flows", "stage": "table", "positions": {"inputs": {"in": 7}, "outputs": {}}}


def _dumped(root: Path, pages: bool = False) -> Path:
    """A folder as a dump leaves it: a few images (and the page server's files, if
    ``pages``)."""
    images = root / bundle.IMAGES
    images.mkdir(parents=True)
    (images / "inventory.img").write_bytes(b"inventory" * 10)
    (images / "core-1.img").write_bytes(bytes(range(256)) * 40)
    (images / "pstree.img").write_bytes(b"")
    if pages:
        (images / "pagemap-1.img").write_bytes(b"map")
        (images / "pages-1.img").write_bytes(b"\0" * 8192)
    return root


def _sealed(tmp_path: Path, streamed: tuple[str, ...] = ()) -> tuple[Path, dict]:
    root = _dumped(tmp_path / "out")
    manifest = bundle.seal(root, 42, dump={"frozen_time": 1}, state=b"state", rings=CONTEXT,
                           stage="flows/table", node="node2", streamed=streamed, host=HOST)  # fmt: skip
    return root, manifest


def _reader(root: Path, manifest: dict, calls: list | None = None) -> bundle.ReadPart:
    def read(name: str, offset: int, size: int) -> tuple[bytes, int]:
        if calls is not None:
            calls.append((name, offset, size))
        return bundle.read_part(root, manifest, name, offset, size)

    return read


def _problems(path: Path) -> list[tuple[str, str]]:
    return [(p.file, p.kind) for p in bundle.verify(path, host=HOST).problems]


def test_seal_lists_every_file_and_verifies(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path)
    assert set(manifest["files"]) == {"images/inventory.img", "images/core-1.img",
                                      "images/pstree.img", "state.bin", "rings.json"}  # fmt: skip
    assert manifest["files"]["images/core-1.img"]["size"] == 256 * 40
    assert json.loads((root / bundle.MANIFEST).read_text()) == manifest
    assert "streamed" not in manifest
    assert bundle.verify(root, host=HOST).ok
    loaded = bundle.load(root, host=HOST)
    assert loaded.state == b"state" and loaded.rings == CONTEXT


def test_verify_refuses_a_wrong_size_a_wrong_sha256_and_an_unlisted_file(tmp_path: Path) -> None:
    root, _ = _sealed(tmp_path)
    core = root / "images/core-1.img"
    data = bytearray(core.read_bytes())
    data[100] ^= 0xFF
    core.write_bytes(bytes(data))
    with (root / "images/inventory.img").open("ab") as grown:
        grown.write(b"x")
    (root / "images/extra.img").write_bytes(b"not dumped")
    assert sorted(_problems(root)) == [
        ("images/core-1.img", "checksum"),
        ("images/extra.img", "extra"),
        ("images/inventory.img", "size"),
    ]
    with pytest.raises(BundleError) as refused:
        bundle.load(root, host=HOST)
    message = str(refused.value)
    assert "\n" not in message
    assert "images/core-1.img: checksum mismatch" in message
    assert "images/inventory.img: size mismatch: 91 bytes, the manifest says 90" in message
    assert "images/extra.img: extra file" in message


def test_verify_refuses_a_manifest_naming_a_file_outside_the_folder(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path)
    (tmp_path / "secret").write_bytes(b"elsewhere")
    for name in ("../secret", "/etc/hostname", "images/../../secret", ".hidden", "a//b"):
        changed = dict(manifest, files={**manifest["files"], name: {"size": 9, "sha256": "0"}})
        (root / bundle.MANIFEST).write_text(json.dumps(changed))
        report = bundle.verify(root, host=HOST)
        assert [p.kind for p in report.problems] == ["manifest"], (name, report.problems)
        assert "not a plain relative file name" in report.problems[0].problem


def test_streamed_pages_may_arrive_unlisted_and_must_arrive(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path, streamed=bundle.PAGE_IMAGES)
    assert manifest["streamed"] == sorted(bundle.PAGE_IMAGES)
    assert sorted(_problems(root)) == [(p, "missing") for p in sorted(bundle.PAGE_IMAGES)]
    (root / "images/pagemap-1.img").write_bytes(b"map")
    (root / "images/pages-1.img").write_bytes(b"\0" * 4096)
    assert bundle.verify(root, host=HOST).ok
    (root / "images/pages-x").mkdir()
    (root / "images/pages-x/y.img").write_bytes(b"")  # not a file of images/ itself
    assert _problems(root) == [("images/pages-x/y.img", "extra")]
    with pytest.raises(BundleError, match="only images/pagemap"):
        bundle.seal(_dumped(tmp_path / "other"), 1, dump={}, streamed=("*",), host=HOST)


def test_read_part_serves_only_listed_files(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path, streamed=bundle.PAGE_IMAGES)
    (root / "images/pages-1.img").write_bytes(b"page")
    (tmp_path / "secret").write_bytes(b"elsewhere")
    data, size = bundle.read_part(root, manifest, "images/core-1.img", 256, 4)
    assert (data, size) == (bytes(range(4)), 256 * 40)
    for name, why in [
        ("../secret", "not a plain relative file name"),
        ("images/../../secret", "not a plain relative file name"),
        ("/etc/hostname", "not a plain relative file name"),
        ("images/pages-1.img", "not listed in its manifest"),  # streamed: never served
        ("images/unknown.img", "not listed in its manifest"),
        (bundle.MANIFEST, "the manifest itself"),
    ]:
        with pytest.raises(BundleError, match=why):
            bundle.read_part(root, manifest, name, 0, 10)
    with pytest.raises(BundleError, match="must not be negative"):
        bundle.read_part(root, manifest, "state.bin", -1, 10)


def test_receive_copies_in_chunks_and_verifies(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path)
    calls: list = []
    dest = tmp_path / "in"
    got = bundle.receive(dest, manifest, _reader(root, manifest, calls), chunk=1000, host=HOST)
    assert got == manifest["sizes"]["total"]
    assert ("images/core-1.img", 10000, 240) in calls  # the last of 11 chunks
    assert all(size <= 1000 for _, _, size in calls)
    assert bundle.verify(dest, host=HOST).ok
    assert (dest / "images/core-1.img").read_bytes() == (root / "images/core-1.img").read_bytes()
    assert (dest / "images").stat().st_mode & 0o777 == 0o700
    assert (dest / "state.bin").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("fault", ["flipped", "truncated", "grown"])
def test_receive_refuses_a_copy_that_does_not_match(tmp_path: Path, fault: str) -> None:
    root, manifest = _sealed(tmp_path)
    core = root / "images/core-1.img"
    data = bytearray(core.read_bytes())
    if fault == "flipped":
        data[5000] ^= 0x01
    elif fault == "truncated":
        del data[4000:]
    else:
        data += b"more"
    core.write_bytes(bytes(data))
    assert core.read_bytes() != bytes(range(256)) * 40  # the fault is there
    with pytest.raises(BundleError) as refused:
        bundle.receive(tmp_path / "in", manifest, _reader(root, manifest), chunk=1000, host=HOST)
    message = str(refused.value)
    assert "\n" not in message and message.count("images/core-1.img") == 1, message
    expected = {
        "flipped": "images/core-1.img: checksum mismatch",
        "truncated": "images/core-1.img: truncated: 4000 bytes, the manifest says 10240",
        "grown": "images/core-1.img: size mismatch at the source: 10244 bytes",
    }[fault]
    assert expected in message, message


def test_receive_writes_nothing_for_a_traversing_manifest(tmp_path: Path) -> None:
    root, manifest = _sealed(tmp_path)
    evil = dict(manifest, files={**manifest["files"], "../escaped": {"size": 1, "sha256": "0"}})
    dest = tmp_path / "in"
    with pytest.raises(BundleError, match="lists a file it may not"):
        bundle.receive(dest, evil, _reader(root, manifest), host=HOST)
    assert not (tmp_path / "escaped").exists() and not dest.exists()
    (dest / "images").mkdir(parents=True)
    (dest / "images/core-1.img").write_bytes(b"came some other way")
    with pytest.raises(BundleError, match="already in"):
        bundle.receive(dest, manifest, _reader(root, manifest), host=HOST)

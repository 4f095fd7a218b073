"""Look inside a bundle: what CRIU captured, decoded through ``pycriu.images``.

Why: before trusting a migration (or when a restore fails) an operator wants to see what is in
the images — which processes, how much memory of which kind, which files and sockets a
restore will have to reopen — without running CRIU. :func:`inspect` returns a JSON-ready
dict; the CLI renders it.

It decodes even a bundle that fails verification (that is when one looks inside): the
verification result is part of the answer, and an image that cannot be decoded is listed
under ``errors`` instead of stopping the rest.
"""

from __future__ import annotations

import bisect
import fnmatch
import ipaddress
import json
import os
import quopri
import stat
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pycriu.images

from dpmigrate.checkpoint import bundle as _bundle
from dpmigrate.errors import BundleError

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# VMA status bits and pagemap flags, as CRIU defines them (pycriu.images.pb2dict).
_VMA_FILE_PRIVATE = 1 << 6
_VMA_FILE_SHARED = 1 << 7
_VMA_ANON_SHARED = 1 << 8
_VMA_ANON_PRIVATE = 1 << 9
_VMA_AREA_MEMFD = 1 << 14
_PE_PARENT = 1 << 0
_PE_PRESENT = 1 << 2

_TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
    6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING",
}  # fmt: skip
_UNIX_STATES = {1: "connected", 7: "unconnected", 10: "listening"}
_SOCK_TYPES = {1: "stream", 2: "dgram", 5: "seqpacket"}
_PROTOS = {6: "tcp", 17: "udp", 136: "udplite"}

MEMORY_KINDS = ("anon_private", "anon_shared", "file_private", "file_shared", "other")


class _Images:
    """Loads images by name through the bundle's folder descriptor (never following a link,
    never opening a special file), remembering which ones failed to decode."""

    def __init__(self, folder: _bundle.BundleFolder) -> None:
        self.folder = folder
        self.errors: list[dict[str, str]] = []

    def names(self, pattern: str) -> list[tuple[str, int]]:
        """(name, size) of the regular files of ``images/`` matching ``pattern``, sorted."""
        prefix = f"{_bundle.IMAGES}/"
        return [
            (rel[len(prefix) :], info.st_size)
            for rel, info in self.folder.entries()
            if rel.startswith(prefix)
            and "/" not in rel[len(prefix) :]
            and stat.S_ISREG(info.st_mode)
            and fnmatch.fnmatchcase(rel[len(prefix) :], pattern)
        ]

    def entries(self, name: str, *, required: bool = True) -> list[dict[str, Any]]:
        rel = f"{_bundle.IMAGES}/{name}"
        if _bundle.name_problem(rel) is not None:
            self.errors.append({"file": _bundle.shown(rel), "problem": "not a valid image name"})
            return []
        try:
            fd = self.folder.open(rel)
        except _bundle.FileProblem as err:
            if required or not _absent(err):
                self.errors.append({"file": err.problem.file, "problem": err.problem.problem})
            return []
        try:
            with os.fdopen(fd, "rb") as image:
                return list(pycriu.images.load(image)["entries"])
        except Exception as err:  # pycriu raises many kinds on damaged input
            problem = _bundle.shown(f"cannot decode: {err}")[:300]
            self.errors.append({"file": rel, "problem": problem})
        return []


def _absent(err: _bundle.FileProblem) -> bool:
    """The file is simply not there (not a link, a special file or unreadable)."""
    return err.problem.kind == "missing" and err.problem.problem == "missing"


def inspect(
    path: str | os.PathLike[str], *, verify: bool = True, trust_owner: bool = False
) -> dict[str, Any]:
    """Decode the bundle at ``path``: processes, memory, files, sockets, state, rings.

    A bundle of another user, or one group or others may write, is refused (BundleError)
    before anything in it is decoded, unless ``trust_owner``: pycriu is no parser to feed
    files a stranger chose. A symbolic link or special file inside is never read (listed under
    ``errors``, and verification fails)."""
    root = Path(path).absolute()
    try:
        folder = _bundle.BundleFolder(root)
    except OSError as err:
        raise BundleError(f"bundle {root}: cannot open it ({err.strerror})") from None
    with folder:
        if not trust_owner:
            problems = folder.trust_problems()
            if problems:
                raise _bundle.refusal(_bundle.VerifyReport(str(root), problems))
        return _inspect(folder, verify, trust_owner)


def _inspect(folder: _bundle.BundleFolder, verify: bool, trust_owner: bool) -> dict[str, Any]:
    root = folder.path
    images = _Images(folder)
    manifest: dict[str, Any] = {}
    try:
        manifest = _bundle.decode_manifest(
            folder.read(_bundle.MANIFEST, _bundle.MAX_MANIFEST_BYTES), str(root)
        )
    except _bundle.FileProblem as err:
        images.errors.append({"file": err.problem.file, "problem": err.problem.problem})
    except BundleError as err:
        images.errors.append({"file": _bundle.MANIFEST, "problem": str(err)})
    out: dict[str, Any] = {"bundle": str(root)}
    if verify:
        out["verify"] = _bundle.verify(root, trust_owner=trust_owner).as_dict()
    out["manifest"] = {
        k: manifest.get(k)
        for k in ("format_version", "dpmigrate_version", "criu_version", "kernel", "arch",
                  "stage", "node", "root_pid", "leave_running", "created", "sizes")
    }  # fmt: skip
    out["dump"] = {
        k: v
        for k, v in (manifest.get("dump") or {}).items()
        if k.endswith("_time") or k.startswith(("pages_", "shpages_"))
    }
    processes = []
    memory = {kind: {"vmas": 0, "mapped_bytes": 0, "dumped_bytes": 0} for kind in MEMORY_KINDS}
    files: list[dict[str, Any]] = []
    sockets: list[dict[str, Any]] = []
    file_table = {entry["id"]: entry for entry in images.entries("files.img", required=False)}
    seen_fd_tables: set[int] = set()
    for node in images.entries("pstree.img"):
        pid = node["pid"]
        core = images.entries(f"core-{pid}.img")
        ids = (images.entries(f"ids-{pid}.img") or [{}])[0]
        name = ""
        if core:
            name = core[0].get("tc", {}).get("comm", "") or core[0].get("thread_core", {}).get(
                "comm", ""
            )
        processes.append(
            {
                "pid": pid, "ppid": node.get("ppid", 0), "pgid": node.get("pgid", 0),
                "sid": node.get("sid", 0), "threads": list(node.get("threads", [])),
                "name": name,
            }
        )  # fmt: skip
        _add_memory(memory, images, pid)
        files_id = ids.get("files_id")
        if files_id is None or files_id in seen_fd_tables:
            continue
        seen_fd_tables.add(files_id)
        for fd in images.entries(f"fdinfo-{files_id}.img", required=False):
            described = _describe_fd(fd, file_table.get(fd.get("id")))
            described["pid"] = pid
            (sockets if described["type"] in ("unix", "inet") else files).append(described)
    out["processes"] = processes
    out["memory"] = memory
    out["memory_total"] = {
        "mapped_bytes": sum(memory[k]["mapped_bytes"] for k in MEMORY_KINDS),
        "dumped_bytes": sum(memory[k]["dumped_bytes"] for k in MEMORY_KINDS),
        "shmem_dumped_bytes": _shmem_bytes(images),
        "pages_files_bytes": sum(size for _, size in images.names("pages-*.img")),
    }
    out["files"] = files
    out["sockets"] = sockets
    out["state"] = _state_summary(folder, images)
    out["rings"] = _rings(folder, images)
    out["errors"] = images.errors
    return out


def _kind(status: int) -> str:
    if status & _VMA_ANON_PRIVATE:
        return "anon_private"
    if status & (_VMA_ANON_SHARED | _VMA_AREA_MEMFD):
        return "anon_shared"
    if status & _VMA_FILE_PRIVATE:
        return "file_private"
    if status & _VMA_FILE_SHARED:
        return "file_shared"
    return "other"


def _add_memory(memory: dict[str, dict[str, int]], images: _Images, pid: int) -> None:
    """Mapped bytes per VMA kind, and bytes of pages CRIU wrote, attributed to their VMA."""
    mm = images.entries(f"mm-{pid}.img", required=False)
    if not mm:
        return
    vmas = sorted(mm[0].get("vmas", []), key=lambda v: v["start"])
    starts = [v["start"] for v in vmas]
    for vma in vmas:
        bucket = memory[_kind(vma.get("status", 0))]
        bucket["vmas"] += 1
        bucket["mapped_bytes"] += vma["end"] - vma["start"]
    for entry in images.entries(f"pagemap-{pid}.img", required=False):
        if "vaddr" not in entry:
            continue  # the header entry (pages_id)
        flags = entry.get("flags", _PE_PRESENT)
        if not flags & _PE_PRESENT or flags & _PE_PARENT:
            continue
        for address, count in _split(entry["vaddr"], entry.get("nr_pages", 0), vmas, starts):
            kind = _kind(address.get("status", 0)) if address else "other"
            memory[kind]["dumped_bytes"] += count * PAGE_SIZE


def _split(
    vaddr: int, pages: int, vmas: list[dict[str, Any]], starts: list[int]
) -> Iterator[tuple[dict[str, Any] | None, int]]:
    """(VMA, page count) pieces of a pagemap run; a run may span adjacent VMAs."""
    end = vaddr + pages * PAGE_SIZE
    while vaddr < end:
        index = bisect.bisect_right(starts, vaddr) - 1
        vma = vmas[index] if index >= 0 and vmas[index]["end"] > vaddr else None
        stop = min(end, vma["end"]) if vma else end
        yield vma, (stop - vaddr) // PAGE_SIZE
        vaddr = stop


def _shmem_bytes(images: _Images) -> int:
    total = 0
    for name, _size in images.names("pagemap-shmem-*.img"):
        for entry in images.entries(name, required=False):
            if "vaddr" in entry and entry.get("flags", _PE_PRESENT) & _PE_PRESENT:
                total += entry.get("nr_pages", 0) * PAGE_SIZE
    return total


def _address(words: list[int], family: int) -> str:
    raw = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)
    try:
        if family == 2:
            return str(ipaddress.IPv4Address(raw[:4]))
        return str(ipaddress.IPv6Address(raw[:16].ljust(16, b"\0")))
    except ValueError:
        return raw.hex()


def _unix_name(value: Any) -> str:
    """pycriu gives bytes fields quoted-printable; abstract names start with NUL → '@'."""
    if not value:
        return ""
    raw = quopri.decodestring(value.encode()) if isinstance(value, str) else bytes(value)
    if raw.startswith(b"\0"):
        return "@" + raw[1:].decode(errors="replace")
    return raw.decode(errors="replace")


def _describe_fd(fd: dict[str, Any], entry: dict[str, Any] | None) -> dict[str, Any]:
    kind = str(fd.get("type", ""))
    out: dict[str, Any] = {"fd": fd.get("fd"), "type": kind.lower()}
    if entry is None:
        return out
    if kind == "REG" and "reg" in entry:
        reg = entry["reg"]
        out.update(type="file", path=reg.get("name", ""), pos=reg.get("pos", 0))
        if "size" in reg:
            out["size"] = reg["size"]
        out["flags"] = reg.get("flags", 0)
    elif kind == "PIPE" and "pipe" in entry:
        out.update(type="pipe", pipe_id=entry["pipe"].get("pipe_id"))
    elif kind == "FIFO" and "fifo" in entry:
        out.update(type="fifo", pipe_id=entry["fifo"].get("pipe_id"))
    elif kind == "UNIXSK" and "usk" in entry:
        usk = entry["usk"]
        out.update(
            type="unix", socket_type=_SOCK_TYPES.get(usk.get("type"), str(usk.get("type"))),
            state=_UNIX_STATES.get(usk.get("state"), str(usk.get("state"))),
            name=_unix_name(usk.get("name")), inode=usk.get("ino"), peer_inode=usk.get("peer", 0),
        )  # fmt: skip
    elif kind == "INETSK" and "isk" in entry:
        isk = entry["isk"]
        family = isk.get("family", 2)
        proto = _PROTOS.get(isk.get("proto"), str(isk.get("proto")))
        state = isk.get("state")
        out.update(
            type="inet", family="ipv4" if family == 2 else "ipv6", proto=proto,
            state=_TCP_STATES.get(state, str(state)) if proto == "tcp" else str(state),
            local=f"{_address(isk.get('src_addr', [0]), family)}:{isk.get('src_port', 0)}",
            remote=f"{_address(isk.get('dst_addr', [0]), family)}:{isk.get('dst_port', 0)}",
        )  # fmt: skip
    return out


def _state_summary(folder: _bundle.BundleFolder, images: _Images) -> dict[str, Any] | None:
    """Size of state.bin and, when it is msgpack ``[version, dict]``, its version and keys.
    Read only as a regular file of the bundle: a link planted there is an error, not state."""
    try:
        raw = folder.read(_bundle.STATE)
    except _bundle.FileProblem as err:
        if not _absent(err):
            images.errors.append({"file": err.problem.file, "problem": err.problem.problem})
        return None
    summary: dict[str, Any] = {"bytes": len(raw), "decodes": False}
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several kinds on arbitrary bytes
        return summary
    if isinstance(value, list | tuple) and len(value) == 2 and isinstance(value[1], dict):
        summary.update(decodes=True, version=value[0], keys=len(value[1]))
    return summary


def _rings(folder: _bundle.BundleFolder, images: _Images) -> Any:
    try:
        return json.loads(folder.read(_bundle.RINGS, _bundle.MAX_MANIFEST_BYTES).decode())
    except _bundle.FileProblem as err:
        if not _absent(err):
            images.errors.append({"file": err.problem.file, "problem": err.problem.problem})
        return None
    except (ValueError, RecursionError) as err:
        problem = _bundle.shown(f"unreadable: {err}")[:300]
        images.errors.append({"file": _bundle.RINGS, "problem": problem})
        return None

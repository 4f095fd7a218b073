"""The criu binary this node uses: where it is, which version, which kernel features work.

CRIU itself is driven over RPC (pycriu, ``criu swrk``) for dumps and restores; this module
only runs the binary for the questions RPC does not answer well: ``--version`` and
``check --feature``. On these machines the binary is a wrapper that runs CRIU 4.2 from a
private prefix through that prefix's own dynamic loader (DESIGN.md §4).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess

from dpmigrate.errors import CriuNotFound

#: Oldest CRIU that works on kernel 6.18 here (3.17 fails on vdso, 4.1 on TCP sockets).
MIN_VERSION = (4, 2)

_VERSION_RE = re.compile(r"Version:\s*(\d+)\.(\d+)(?:\.(\d+))?")

#: Lines every criu run prints here (CAP_SYS_RESOURCE is dropped) that are not failures.
HARMLESS_LINES = ("Can't setup RLIMIT_NOFILE", "Can't keep kdat cache on non-tempfs")

_FIX = "run `scripts/setup` (as root) to install CRIU 4.2, or set DPMIGRATE_CRIU to a criu >= 4.2"


@dataclasses.dataclass(frozen=True)
class CheckResult:
    ok: bool
    output: str


class CriuBinary:
    """One criu executable, validated on construction."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise CriuNotFound(f"criu not found at {path}: {_FIX}")
        if not os.access(path, os.X_OK):
            raise CriuNotFound(f"criu at {path} is not executable: {_FIX}")
        self.path = path
        self._version: tuple[int, int, int] | None = None

    def _run(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self.path, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
        except OSError as err:
            raise CriuNotFound(f"criu at {self.path} cannot run ({err.strerror}): {_FIX}") from err
        except subprocess.TimeoutExpired as err:
            raise CriuNotFound(
                f"`{self.path} {' '.join(args)}` did not finish in {timeout} s: {_FIX}"
            ) from err

    def version(self) -> tuple[int, int, int]:
        """(major, minor, patch) as printed by ``criu --version``."""
        if self._version is None:
            result = self._run("--version")
            match = _VERSION_RE.search(result.stdout + result.stderr)
            if result.returncode != 0 or not match:
                text = (result.stderr or result.stdout).strip().splitlines()
                raise CriuNotFound(
                    f"`{self.path} --version` failed ({text[-1] if text else 'no output'}): {_FIX}"
                )
            self._version = (int(match[1]), int(match[2]), int(match[3] or 0))
        return self._version

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version()))

    def require_supported(self) -> None:
        """Raise CriuNotFound unless this criu is at least MIN_VERSION."""
        if self.version()[:2] < MIN_VERSION:
            raise CriuNotFound(
                f"criu at {self.path} is version {self.version_text}; dpmigrate needs "
                f"{'.'.join(map(str, MIN_VERSION))} or newer on this kernel: {_FIX}"
            )

    def check(self, feature: str | None = None) -> CheckResult:
        """``criu check`` (whole) or ``criu check --feature FEATURE``; needs root."""
        args = ["check"] + (["--feature", feature] if feature else [])
        result = self._run(*args)
        lines = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.strip() and not any(h in line for h in HARMLESS_LINES)
        ]
        return CheckResult(result.returncode == 0, "\n".join(lines))

"""Shared settings of the fuzz tests: how many cases each decoder gets.

Every decoder that reads bytes from a socket or a file is fuzzed with hypothesis; CI runs
``FUZZ_EXAMPLES`` cases of each (thousands), a developer can lower or raise it with
``DPMIGRATE_FUZZ_EXAMPLES``. No deadline: these machines are shared and noisy, and a slow case
is not a failure (a hang is caught by pytest-timeout).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

FUZZ_EXAMPLES = int(os.environ.get("DPMIGRATE_FUZZ_EXAMPLES", "2000"))

fuzz = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the clone
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

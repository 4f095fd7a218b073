"""Test support that ships with dpmigrate: the ring conformance kit and a ring peer process.

Any ring transport, including one written outside this project, proves itself by passing
:data:`dpmigrate.testing.conformance.CHECKS`.
"""

from dpmigrate.testing.conformance import CHECKS, Harness

__all__ = ["CHECKS", "Harness"]

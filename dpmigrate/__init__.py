"""dpmigrate: run data-plane stages across nodes and live-migrate them without losing a message.

The package is laid out by concern (DESIGN.md §2): ``transports`` (rings), ``native`` (the C
core of the shm ring), ``statesync``, ``checkpoint``, ``migrate``, ``runtime``; dependencies
point one way, from ``migrate`` down to ``native``.
"""

__version__ = "0.1.0"

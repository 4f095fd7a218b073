"""Builds dpmigrate's C core (dpmigrate/native) as extensions: the shared-memory ring, and
the tcp ring consumer's frame cutter.

Everything else lives in pyproject.toml; setuptools still needs setup.py to declare
extension modules.
"""

from setuptools import Extension, setup

_FLAGS = ["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"]

setup(
    ext_modules=[
        Extension(
            "dpmigrate.native._ring",
            sources=["dpmigrate/native/ring.c", "dpmigrate/native/_ringmodule.c"],
            depends=["dpmigrate/native/ring.h"],
            extra_compile_args=_FLAGS,
        ),
        Extension(
            "dpmigrate.native._frames",
            sources=["dpmigrate/native/_frames.c"],
            extra_compile_args=_FLAGS,
        ),
    ]
)

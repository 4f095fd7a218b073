"""Builds the C core of the shared-memory ring (dpmigrate/native) as an extension.

Everything else lives in pyproject.toml; setuptools still needs setup.py to declare
extension modules.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "dpmigrate.native._ring",
            sources=["dpmigrate/native/ring.c", "dpmigrate/native/_ringmodule.c"],
            depends=["dpmigrate/native/ring.h"],
            extra_compile_args=[
                "-O2",
                "-std=gnu11",
                "-Wall",
                "-Wextra",
                "-Werror=implicit-function-declaration",
            ],
        )
    ]
)

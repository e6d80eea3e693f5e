"""The optional C loops (weightmix/_kernels.c): built where a C compiler is found; without one
the install goes on and weightmix runs the same arithmetic as torch operations."""

import sys

from setuptools import Extension, setup

# no fused multiply-add (the loops must round as torch does); no floating-point traps, so
# that comparisons and selects vectorize (the results are the same)
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-trapping-math"]

setup(
    ext_modules=[
        Extension(
            "weightmix._kernels",
            ["weightmix/_kernels.c"],
            extra_compile_args=[] if sys.platform == "win32" else FLAGS,
            optional=True,
        )
    ]
)

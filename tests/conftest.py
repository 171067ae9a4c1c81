"""Strict test setup: float64 available, no implicit rank promotion, fast XLA compiles.

The suite compiles about two thousand small XLA programs and runs each a few
times, so on a 2-core machine most of its time is LLVM optimising CPU code.
``--xla_backend_optimization_level=0`` (set here before JAX loads, and passed to
every subprocess a test starts, see ``helpers.with_test_xla_flags``) halves
the suite's time; XLA's own HLO passes still run, the arithmetic is the same
IEEE float operations, and the programs are only slower to run, which these
small arrays never notice. Benchmarks and experiments do not use it.
"""
import os

from helpers import with_test_xla_flags

os.environ["XLA_FLAGS"] = with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))

import jax  # noqa: E402  (after XLA_FLAGS: JAX reads it once, when its backend starts)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

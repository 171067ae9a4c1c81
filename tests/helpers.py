"""Small helpers shared by test modules (imported by conftest before JAX loads: no JAX import at the top)."""

#: compile CPU code without LLVM's optimisation passes: the suite is compile-bound (see conftest.py)
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def with_test_xla_flags(flags: str = "") -> str:
    """``flags`` (an ``XLA_FLAGS`` value) with the suite's compile flag added once."""
    return flags if TEST_XLA_FLAGS in flags.split() else f"{flags} {TEST_XLA_FLAGS}".strip()


def init_params(layer, key, in_shape):
    """layer.init under one jit (eager init dispatches, and compiles, op by op)."""
    import jax

    box = []

    def run(k):
        out_shape, params = layer.init(k, in_shape)
        box.append(tuple(out_shape))
        return params

    params = jax.jit(run)(key)
    return box[0], params

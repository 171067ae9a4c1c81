"""Generic tests over the public registry of layer cases (jaxprop.testing.CASES).

Each test is one of jaxprop.testing's generic checks, the functions users run
on their own cases; here they run on every jaxprop layer.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop import testing as jt

CASES = jt.CASES
DTYPES = [jnp.float64, jnp.float32]
# Op-by-op (eager) runs on a representative subset (the CI machine has 2 cores): float32 one case of
# each kind; float64 those and one more of each layer file. Every case runs jitted in both dtypes,
# with finite differences in the jitted float64 run.
EAGER_FLOAT32 = {"dense", "relu", "gelu_tanh", "softmax", "dropout_train", "serial", "conv1d", "max_pool",
                 "batch_norm", "layer_norm", "embedding", "rnn", "attention", "remat"}
EAGER_FLOAT64 = EAGER_FLOAT32 | {"dense_3d", "log_softmax", "reshape", "dropout_key", "residual", "repeat",
                                 "conv2d", "avg_pool", "group_norm", "batch_norm_eval", "gru_reverse_last_t1",
                                 "lstm_reverse_last", "positional_embedding"}


def _skip_unless_run(reason):
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_autodiff(case, dtype, jit):
    if not jit and case.name not in (EAGER_FLOAT32 if dtype == jnp.float32 else EAGER_FLOAT64):
        pytest.skip("eager on a representative subset (every case runs jitted in float64 and float32)")
    _skip_unless_run(jt.check_backward(case, dtype, jit))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_have_params_structure(case):
    jt.check_structure(case, jnp.float64)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_custom_vjp_bridge(case):
    _skip_unless_run(jt.check_bridge(case, jnp.float64))


@pytest.mark.parametrize("case", [c for c in CASES if c.bad_shape], ids=str)
def test_bad_shape_names_layer(case):
    jt.check_bad_shape(case, jnp.float64)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wrong_dy_shape_rejected(case):
    _skip_unless_run(jt.check_dy_shape(case, jnp.float64))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_nan_propagates_as_in_jax_vjp(case):
    _skip_unless_run(jt.check_nan(case, jnp.float64))


@pytest.mark.parametrize("save", ["mask", "output"])
def test_relu_gradient_at_exact_zero_matches_jax_nn_relu(save):
    """x = 0 exactly: jax.nn.relu's gradient is 0 there (jnp.maximum's would be 0.5)."""
    layer = jp.relu(save=save)
    x = jnp.array([[-1.5, 0.0, 2.0], [0.0, 3.0, -0.0]])
    dy = jnp.array([[0.7, -1.3, 0.4], [2.1, -0.6, 0.9]])
    y, cache = layer.forward((), x)
    _, dx = layer.backward(cache, dy)
    _, vjp = jax.vjp(jax.nn.relu, x)
    np.testing.assert_array_equal(y, jax.nn.relu(x))
    np.testing.assert_array_equal(dx, vjp(dy)[0])
    np.testing.assert_array_equal(dx, jnp.array([[0.0, 0.0, 0.4], [0.0, -0.6, 0.0]]))


ACTIVATIONS = [
    ("relu", jp.relu, jax.nn.relu),
    ("relu_save_output", lambda: jp.relu(save="output"), jax.nn.relu),
    ("leaky_relu", lambda: jp.leaky_relu(0.1), lambda a: jax.nn.leaky_relu(a, 0.1)),
    ("elu", lambda: jp.elu(0.7), lambda a: jax.nn.elu(a, 0.7)),
    ("sigmoid", jp.sigmoid, jax.nn.sigmoid),
    ("tanh", jp.tanh, jnp.tanh),
    ("softplus", jp.softplus, jax.nn.softplus),
    ("gelu", jp.gelu, lambda a: jax.nn.gelu(a, approximate=False)),
    ("gelu_tanh", lambda: jp.gelu(approximate=True), lambda a: jax.nn.gelu(a, approximate=True)),
    ("silu", jp.silu, jax.nn.silu),
    ("softmax", jp.softmax, jax.nn.softmax),
    ("log_softmax", jp.log_softmax, jax.nn.log_softmax),
    ("identity", jp.identity, lambda a: a),
]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name,make,ref", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_nan_and_inf_as_jax_nn(name, make, ref, jit):
    """NaN (and +-inf, +-0) give jax.nn's y and jax.vjp's dx: relu used to map NaN to 0.
    Softmax rows: one NaN makes its row NaN, the other row stays finite."""
    layer = make()
    x = jnp.array([[-1.5, jnp.nan, 2.0, 0.0, -0.0, jnp.inf, -jnp.inf],
                   [0.3, -0.7, 1.1, -2.0, 0.5, 0.0, 1.9]])
    dy = jnp.array([[0.7, -1.3, 0.4, 2.1, -0.6, 0.9, 0.3],
                    [-0.2, 0.8, 1.5, -0.4, 0.6, -1.1, 0.25]])
    fwd = jax.jit(layer.forward) if jit else layer.forward
    bwd = jax.jit(layer.backward) if jit else layer.backward
    y, cache = fwd((), x)
    _, dx = bwd(cache, dy)
    y_ref, vjp = jax.vjp(ref, x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-14, atol=0)      # equal_nan: NaN where jax.nn has NaN
    np.testing.assert_allclose(dx, vjp(dy)[0], rtol=1e-13, atol=1e-300)
    assert bool(jnp.isnan(y[0, 1])), "a NaN input must give a NaN output"


@pytest.mark.parametrize("save", ["mask", "output"])
def test_relu_finite_inputs_bit_identical(save):
    """The NaN fix leaves every finite input's y and dx bit for bit as before: where(x > 0, x, 0)."""
    layer = jp.relu(save=save)
    x = jax.random.normal(jax.random.key(0), (64, 33)).at[0, :4].set(jnp.array([0.0, -0.0, 1e-310, -1e-310]))
    dy = jax.random.normal(jax.random.key(1), x.shape)
    for fwd, bwd in [(layer.forward, layer.backward), (jax.jit(layer.forward), jax.jit(layer.backward))]:
        y, cache = fwd((), x)
        _, dx = bwd(cache, dy)
        np.testing.assert_array_equal(np.asarray(y).view(np.int64),
                                      np.asarray(jnp.where(x > 0, x, 0.0)).view(np.int64))
        np.testing.assert_array_equal(np.asarray(dx).view(np.int64),
                                      np.asarray(jnp.where(x > 0, dy, 0.0)).view(np.int64))


def test_relu_rejects_unknown_save():
    with pytest.raises(ValueError, match="relu: save must be 'mask' or 'output', got 'x'"):
        jp.relu(save="x")

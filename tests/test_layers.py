"""Generic tests over the registry of layer cases (tests/cases.py)."""
import jax
import jax.test_util
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from cases import CASES

DTYPES = [jnp.float64, jnp.float32]


def setup(case, dtype, seed=0):
    layer = case.make()
    k_init, k_x = jax.random.split(jax.random.key(seed))
    _, params = layer.init(k_init, case.in_shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    x_fn = case.x_fn or (lambda k, s, d: jax.random.normal(k, s, d))
    x = x_fn(k_x, case.in_shape, dtype)
    ctx = dict(case.ctx)
    if layer.stateful and "state" not in ctx:
        ctx["state"] = jax.tree_util.tree_map(lambda a: a.astype(dtype), jp.init_state(layer, case.in_shape))
    return layer, params, x, ctx


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_autodiff(case, dtype, jit):
    layer, params, x, ctx = setup(case, dtype)
    rtol = case.rtol32 if (dtype == jnp.float32 and case.rtol32) else None
    with jax.default_matmul_precision("highest"):
        report = jp.check_layer(layer, params, x, jit=jit, fd=case.fd and dtype == jnp.float64 and not jit,
                                rtol=rtol, **ctx)
    assert report.ok, str(report)
    assert report.dtype == jnp.dtype(dtype).name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_grads_have_params_structure(case):
    layer, params, x, ctx = setup(case, jnp.float64)
    # forward and backward as two separate jitted functions: the cache crosses a jit boundary
    y, cache = jax.jit(lambda p, xx: jp.call_forward(layer, p, xx, **ctx))(params, x)
    out_shape = jp.output_shape(layer, case.in_shape)
    assert y.shape == out_shape
    dy = jax.random.normal(jax.random.key(3), y.shape, y.dtype)
    grads, dx = jax.jit(layer.backward)(cache, dy)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(cache))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_custom_vjp_bridge(case):
    layer, params, x, ctx = setup(case, jnp.float64)
    f = jax.jit(jp.as_custom_vjp(layer, **ctx))
    jax.test_util.check_vjp(f, lambda p, xx: jax.vjp(f, p, xx), (params, x), atol=1e-6, rtol=1e-6, eps=1e-5)
    # and its VJP is the hand-written backward
    y, cache = jp.call_forward(layer, params, x, **ctx)
    dy = jax.random.normal(jax.random.key(5), y.shape, y.dtype)
    g_bridge = jax.jit(lambda p, xx, d: jax.vjp(f, p, xx)[1](d))(params, x, dy)
    g_hand = layer.backward(cache, dy)
    for a, b in zip(jax.tree_util.tree_leaves(g_bridge), jax.tree_util.tree_leaves(g_hand)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14 * float(jnp.max(jnp.abs(b)) + 1))


@pytest.mark.parametrize("case", [c for c in CASES if c.bad_shape], ids=str)
def test_bad_shape_names_layer(case):
    layer, params, _, ctx = setup(case, jnp.float64)
    x = jnp.zeros(case.bad_shape)
    with pytest.raises(ValueError) as err:
        jp.call_forward(layer, params, x, **ctx)
    msg = str(err.value)
    assert "dense" in msg or case.name in msg
    assert str(case.bad_shape) in msg or str(case.bad_shape[-1]) in msg


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wrong_dy_shape_rejected(case):
    layer, params, x, ctx = setup(case, jnp.float64)
    y, cache = jp.call_forward(layer, params, x, **ctx)
    if case.ctx.get("train") is False and not jax.tree_util.tree_leaves(params):
        pytest.skip("identity in evaluation mode: dy passes through unchecked")
    bad = jnp.zeros(y.shape[:-1] + (y.shape[-1] + 1,))
    with pytest.raises(ValueError, match="expected dy of shape"):
        layer.backward(cache, bad)


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


def test_relu_rejects_unknown_save():
    with pytest.raises(ValueError, match="relu: save must be 'mask' or 'output', got 'x'"):
        jp.relu(save="x")

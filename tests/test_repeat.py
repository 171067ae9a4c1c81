"""repeat(block, n): a lax.scan forward and a reverse-scan backward.

The generic checks (jax.vjp in float64/float32, jit, bridge, shape errors)
run through the registry in tests/cases.py; here: equality with serial,
stochastic and stateful blocks, the cache without copied weights, and a
program whose size does not grow with n.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.core import Layer
from helpers import init_params

N_BLOCKS = 4


def dense_relu(w=6):
    return jp.serial(jp.dense(w), jp.relu())


def residual_mlp(w=6):
    return jp.residual(jp.serial(jp.dense(w), jp.tanh(), jp.dense(w)))


def _serial_and_repeat(make_block, n, in_shape, dtype, seed=0):
    rep = jp.repeat(make_block(), n)
    _, params = init_params(rep, jax.random.key(seed), in_shape)
    params = jp.cast_floating(params, dtype)
    ser = jp.serial(*[make_block() for _ in range(n)])
    return rep, params, ser, tuple(jp.unstack_params(params, n))


def _assert_trees_close(a, b, rtol, atol=0.0):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(la, lb):
        np.testing.assert_allclose(np.asarray(u, np.float64), np.asarray(v, np.float64), rtol=rtol, atol=atol)


@pytest.mark.parametrize("make_block,dtype,jit", [
    (dense_relu, jnp.float64, False), (residual_mlp, jnp.float64, True), (dense_relu, jnp.float32, True)],
    ids=["dense_relu-float64-eager", "residual-float64-jit", "dense_relu-float32-jit"])
def test_forward_and_gradients_equal_serial(make_block, dtype, jit):
    rep, p_rep, ser, p_ser = _serial_and_repeat(make_block, N_BLOCKS, (5, 6), dtype)
    x = jax.random.normal(jax.random.key(1), (5, 6), dtype)
    dy = jax.random.normal(jax.random.key(2), (5, 6), dtype)

    def run(layer, p):
        y, cache = layer.forward(p, x)
        grads, dx = layer.backward(cache, dy)
        return y, grads, dx

    run = jax.jit(run, static_argnums=0) if jit else run
    y_r, g_r, dx_r = run(rep, p_rep)
    y_s, g_s, dx_s = run(ser, p_ser)
    tol = 1e-12 if dtype == jnp.float64 else 1e-5
    _assert_trees_close(y_r, y_s, tol, tol)
    _assert_trees_close(dx_r, dx_s, tol, tol)
    _assert_trees_close(tuple(jp.unstack_params(g_r, N_BLOCKS)), g_s, tol, tol)
    assert jax.tree_util.tree_structure(g_r) == jax.tree_util.tree_structure(p_rep)


def test_network_with_repeat_matches_jax_grad():
    """repeat inside a network, with a loss, against jax.grad (float64, random labels).
    Both dtypes, eager and jitted, with finite differences: the registry (tests/cases.py)."""
    net = jp.serial(jp.dense(8), jp.tanh(), jp.repeat(jp.serial(jp.dense(8), jp.gelu()), 3), jp.dense(3))
    loss = jp.softmax_cross_entropy()
    _, params = init_params(net, jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)

    def cost(p, xx):
        return loss.forward(jp.call_forward(net, p, xx)[0], y)[0]

    def hand(p, xx):
        pred, cache = jp.call_forward(net, p, xx)
        value, lcache = loss.forward(pred, y)
        return value, net.backward(cache, loss.backward(lcache, jnp.ones((), value.dtype)))

    value, (grads, dx) = jax.jit(hand)(params, x)
    ref_value, (ref_grads, ref_dx) = jax.jit(jax.value_and_grad(cost, argnums=(0, 1)))(params, x)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(jax.tree_util.tree_leaves((grads, dx)), jax.tree_util.tree_leaves((ref_grads, ref_dx))):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-9 * max(float(jnp.max(jnp.abs(r))), 1e-3)


def test_dropout_masks_match_serial():
    make = lambda: jp.serial(jp.dense(6), jp.dropout(0.4))
    rep, p_rep, ser, p_ser = _serial_and_repeat(make, 3, (5, 6), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 6))
    dy = jax.random.normal(jax.random.key(2), x.shape)

    @jax.jit
    def run(p_rep, p_ser, key):
        y_r, c_r = jp.call_forward(rep, p_rep, x, key=key)
        y_s, c_s = jp.call_forward(ser, p_ser, x, key=key)
        return y_r, y_s, rep.backward(c_r, dy), ser.backward(c_s, dy)

    y_r, y_s, (g_r, dx_r), (g_s, dx_s) = run(p_rep, p_ser, jax.random.key(9))
    np.testing.assert_allclose(y_r, y_s, rtol=1e-12)
    np.testing.assert_allclose(dx_r, dx_s, rtol=1e-12, atol=1e-15)
    _assert_trees_close(tuple(jp.unstack_params(g_r, 3)), g_s, 1e-12, 1e-15)
    # a different key gives a different mask
    y_other = run(p_rep, p_ser, jax.random.key(10))[0]
    assert not np.allclose(y_other, y_r)


def running_mean() -> Layer:
    """A stateful test layer: y = x * a, and state tracks the mean of x."""
    def init(key, in_shape):
        del key
        return tuple(in_shape), {"a": jnp.full((in_shape[-1],), 1.5)}

    def forward(params, x, *, state, train=True):
        del train
        a = params["a"]
        return x * a[None, :], {"x": x, "a": a, "mean": x.mean(0), "old": state["mean"]}

    def backward(cache, dy):
        return {"a": jnp.sum(dy * cache["x"], axis=0)}, dy * cache["a"][None, :]

    def init_state(in_shape):
        return {"mean": jnp.zeros((in_shape[-1],))}

    def update_state(state, cache):
        return {"mean": 0.5 * state["mean"] + 0.5 * cache["mean"]}

    return Layer(init, forward, backward, name="running_mean", init_state=init_state,
                 update_state=update_state)


def test_stateful_block_states_match_serial():
    make = lambda: jp.serial(jp.dense(4), running_mean())
    rep, p_rep, ser, p_ser = _serial_and_repeat(make, 3, (5, 4), jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    y = jax.random.normal(jax.random.key(2), (5, 4))
    s_rep, s_ser = jp.init_state(rep, (5, 4)), jp.init_state(ser, (5, 4))
    (v_r, ns_r), g_r = jax.jit(jp.value_and_grad(rep, jp.mse()))(p_rep, x, y, state=s_rep)
    (v_s, ns_s), g_s = jax.jit(jp.value_and_grad(ser, jp.mse()))(p_ser, x, y, state=s_ser)
    np.testing.assert_allclose(v_r, v_s, rtol=1e-12)
    _assert_trees_close(tuple(jp.unstack_params(ns_r, 3)), ns_s, 1e-12)
    _assert_trees_close(tuple(jp.unstack_params(g_r, 3)), g_s, 1e-12, 1e-15)
    assert float(jnp.abs(ns_r[1]["mean"]).max()) > 0     # the state did move


def _step_cache(block, n=8):
    rep = jp.repeat(block, n)
    params = jax.eval_shape(lambda k: rep.init(k, (4, 16))[1], jax.random.key(0))
    cache = jax.eval_shape(lambda p: rep.forward(p, jnp.ones((4, 16)))[1], params)
    return cache, [(leaf.shape, leaf.dtype) for leaf in jax.tree_util.tree_leaves(cache["steps"])]


def test_cache_keeps_weights_once():
    cache, leaves = _step_cache(jp.serial(jp.dense(16), jp.relu(save="output")))
    shapes = [s for s, _ in leaves]
    assert (8, 16, 16) not in shapes, shapes        # no per-step copy of w
    assert shapes.count((8, 4, 16)) == 0, shapes    # dense's x and relu's y are not stacked ...
    assert cache["inputs"].shape == (8, 4, 16)      # ... the step inputs are, once


def test_default_relu_stacks_a_boolean_mask():
    _, leaves = _step_cache(dense_relu(16))
    stacked = [(s, d) for s, d in leaves if s == (8, 4, 16)]
    assert stacked == [((8, 4, 16), jnp.dtype(bool))], leaves   # one byte per unit, not a float copy


def _hlo_lines(n):
    net = jp.repeat(dense_relu(8), n)
    params = jax.eval_shape(lambda k: net.init(k, (4, 8))[1], jax.random.key(0))
    loss = jp.mse()
    vg = jp.value_and_grad(net, loss)
    x = jnp.ones((4, 8))
    return len(jax.jit(vg).lower(params, x, x).as_text().splitlines())


def test_program_size_does_not_grow_with_depth():
    assert _hlo_lines(64) == _hlo_lines(4)


def test_init_stacks_independent_blocks():
    rep = jp.repeat(jp.dense(5), 3)
    out_shape, params = init_params(rep, jax.random.key(0), (2, 5))
    assert out_shape == (2, 5)
    assert params["w"].shape == (3, 5, 5) and params["b"].shape == (3, 5)
    assert not np.allclose(params["w"][0], params["w"][1])
    back = jp.stack_params(jp.unstack_params(params, 3))
    _assert_trees_close(back, params, 0.0)


def test_errors():
    with pytest.raises(ValueError, match="positive int"):
        jp.repeat(jp.dense(3), 0)
    with pytest.raises(TypeError, match="not a jaxprop Layer"):
        jp.repeat(jp.relu, 2)
    with pytest.raises(ValueError, match="keep the shape"):
        jp.repeat(jp.dense(3), 2).init(jax.random.key(0), (2, 5))
    rep = jp.repeat(jp.dense(4), 3)
    params = jax.eval_shape(lambda k: rep.init(k, (2, 4))[1], jax.random.key(0))
    bad = jax.tree_util.tree_map(lambda a: jnp.zeros((2,) + a.shape[1:], a.dtype), params)
    with pytest.raises(ValueError, match="leading axis of size 3"):
        rep.forward(bad, jnp.ones((2, 4)))

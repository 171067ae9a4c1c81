"""Mixed precision: low-precision forward/backward, float32 master weights, loss scaling."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprop as jp
from helpers import init_params


def mlp():
    return jp.serial(jp.dense(32), jp.relu(), jp.dense(32), jp.tanh(), jp.dense(5))


def setup(master=jnp.float32, n=64, d=16, seed=0):
    net, loss = mlp(), jp.softmax_cross_entropy()
    _, params = init_params(net, jax.random.key(seed), (n, d))
    params = jp.cast_floating(params, master)
    x = jax.random.normal(jax.random.key(seed + 1), (n, d), master)
    y = jax.random.randint(jax.random.key(seed + 2), (n,), 0, 5)
    return net, loss, params, x, y


def mixed_cost(net, loss, compute_dtype):
    """The same cost for jax.grad: casts in the forward, loss in float32."""
    def cost(params, x, y):
        z, _ = jp.call_forward(net, jp.cast_floating(params, compute_dtype), x.astype(compute_dtype))
        return loss.forward(z.astype(jnp.float32), y)[0]
    return cost


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_same_dtype_is_plain_value_and_grad():
    net, loss, params, x, y = setup(jnp.float32)
    v1, g1 = jax.jit(jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.float32))(params, x, y)
    v2, g2 = jax.jit(jp.value_and_grad(net, loss))(params, x, y)
    np.testing.assert_array_equal(v1, v2)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_float32_compute_float64_master_matches_jax_grad(jit):
    """The casts' backward is right: float64 master weights, float32 compute,
    against jax.grad of the same cast forward (float32 tolerance 1e-4)."""
    net, loss = jp.serial(jp.dense(8), jp.tanh(), jp.dense(3)), jp.softmax_cross_entropy()
    _, params = init_params(net, jax.random.key(0), (6, 5))
    x = jax.random.normal(jax.random.key(1), (6, 5))
    y = jax.random.randint(jax.random.key(2), (6,), 0, 3)
    vg = jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.float32)
    vg = jax.jit(vg) if jit else vg
    with jax.default_matmul_precision("highest"):
        value, grads = vg(params, x, y, scale=8.0)
        ref = jax.jit(jax.grad(mixed_cost(net, loss, jnp.float32)))(params, x, y)
    assert value.dtype == jnp.float32
    for g, r, p in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref),
                       jax.tree_util.tree_leaves(params)):
        assert g.dtype == p.dtype == jnp.float64
        err = float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r)))
        assert err <= 1e-4, err


def test_low_precision_gradients():
    """bfloat16 and float16 compute: against jax.grad of the same low-precision
    forward, and against the float32 gradient (accuracy)."""
    net, loss, params, x, y = setup(jnp.float32)
    v32, g32 = jax.jit(jp.value_and_grad(net, loss))(params, x, y)
    for compute_dtype in (jnp.bfloat16, jnp.float16):
        value, grads = jax.jit(jp.mixed_value_and_grad(net, loss, compute_dtype=compute_dtype))(params, x, y)
        ref = jax.jit(jax.grad(mixed_cost(net, loss, compute_dtype)))(params, x, y)
        assert abs(float(value) - float(v32)) <= 2e-2 * abs(float(v32))
        for g, r, f in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref),
                           jax.tree_util.tree_leaves(g32)):
            assert g.dtype == jnp.float32
            assert rel_l2(g, r) <= 3e-2       # same low-precision forward, autodiff backward
            assert rel_l2(g, f) <= 1e-1       # accuracy against the float32 gradient


def test_bfloat16_training_tracks_float32():
    net, loss, params, x, y = setup(jnp.float32, n=128)
    tx = optax.sgd(0.2)

    def trainer(vg):
        @jax.jit
        def run(params):
            def step(carry, _):
                p, s = carry
                value, grads = vg(p, x, y)
                updates, s = tx.update(grads, s, p)
                return (optax.apply_updates(p, updates), s), value
            return jax.lax.scan(step, (params, tx.init(params)), None, length=100)[1]
        return run

    curve32 = trainer(jp.value_and_grad(net, loss))(params)
    curve16 = trainer(jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.bfloat16))(params)
    assert float(curve32[-1]) < 0.5 * float(curve32[0])       # it learns
    np.testing.assert_allclose(curve16[-1], curve32[-1], rtol=0.1, atol=0.02)


def test_float16_needs_loss_scaling():
    """Cotangents of ~2e-8 flush to zero in float16; a loss scale keeps them.
    The forward is exact in float16 (x in {-1, 1}, w in multiples of 1/8), so
    only the backward's range matters here."""
    n = 8192
    net = jp.dense(4)
    x = jnp.sign(jax.random.normal(jax.random.key(1), (n, 8), jnp.float32))
    w = jax.random.randint(jax.random.key(0), (8, 4), -8, 9).astype(jnp.float32) / 8
    params = {"w": w, "b": jnp.zeros((4,), jnp.float32)}
    y = x @ w + 1e-4 * jax.random.normal(jax.random.key(2), (n, 4), jnp.float32)   # dz ~ 2e-4 / n
    _, g32 = jp.value_and_grad(net, jp.mse())(params, x, y)
    vg = jax.jit(jp.mixed_value_and_grad(net, jp.mse(), compute_dtype=jnp.float16))
    _, g_plain = vg(params, x, y, scale=1.0)
    _, g_scaled = vg(params, x, y, scale=2.0 ** 15)
    assert rel_l2(g_plain["w"], g32["w"]) > 0.5                 # underflow: mostly lost
    assert rel_l2(g_scaled["w"], g32["w"]) < 1e-2               # recovered by scaling


def test_dynamic_loss_scale_rules():
    ls = jp.dynamic_loss_scale(1024.0)
    ls = jp.adjust_loss_scale(ls, jnp.asarray(False))
    assert float(ls.scale) == 512.0 and int(ls.good_steps) == 0
    for _ in range(3):
        ls = jp.adjust_loss_scale(ls, jnp.asarray(True), period=3)
    assert float(ls.scale) == 1024.0 and int(ls.good_steps) == 0
    ls = jp.adjust_loss_scale(jp.dynamic_loss_scale(1.0), False)
    assert float(ls.scale) == 1.0                               # min_scale
    assert bool(jp.all_finite({"a": jnp.ones(3), "n": jnp.arange(3)}))
    assert not bool(jp.all_finite({"a": jnp.array([1.0, jnp.inf])}))


def test_overflowing_step_is_skipped():
    net, loss, params, x, y = setup(jnp.float32)
    x = x * 3e4                                                  # float16 max is 65504
    vg = jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.float16)
    tx = optax.sgd(0.1)

    @jax.jit
    def step(params, opt_state, ls):
        value, grads = vg(params, x, y, scale=ls.scale)
        ok = jp.all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)
        return (jax.tree_util.tree_map(keep, new_params, params),
                jax.tree_util.tree_map(keep, new_opt, opt_state), jp.adjust_loss_scale(ls, ok), ok)

    new_params, _, ls, ok = step(params, tx.init(params), jp.dynamic_loss_scale(2.0 ** 15))
    assert not bool(ok)
    assert float(ls.scale) == 2.0 ** 14
    for a, b in zip(jax.tree_util.tree_leaves(new_params), jax.tree_util.tree_leaves(params)):
        np.testing.assert_array_equal(a, b)


def test_rejects_non_layer():
    with pytest.raises(TypeError, match="jaxprop Layer"):
        jp.mixed_value_and_grad(jp.relu, jp.mse())

"""dropout(rate, save_mask=...): both caches give jax.grad's gradients and the same numbers, and
save_mask=False really keeps no mask (the backward draw is neither merged with the forward's nor
hoisted into the forward pass by XLA)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.combinators import repeat

MODES = [(jnp.float64, True), (jnp.float64, False), (jnp.float32, True), (jnp.float32, False)]


def _ids(m):
    return f"{jnp.dtype(m[0]).name}-{'jit' if m[1] else 'eager'}"


@pytest.mark.parametrize("save_mask", [True, False])
@pytest.mark.parametrize("mode", MODES, ids=_ids)
def test_layer_matches_autodiff(save_mask, mode):
    dtype, jit = mode
    # random cotangent inside assert_gradients_match (check_layer), against jax.vjp of the forward
    jp.testing.assert_gradients_match(jp.dropout(0.3, save_mask=save_mask), in_shape=(7, 5, 3),
                                      dtype=dtype, jit=jit, key=jax.random.key(3))


@pytest.mark.parametrize("save_mask", [True, False])
@pytest.mark.parametrize("mode", MODES, ids=_ids)
def test_net_matches_jax_grad(save_mask, mode):
    dtype, jit = mode
    net = jp.serial(jp.dense(6), jp.tanh(), jp.dropout(0.5, save_mask=save_mask), jp.dense(4),
                    jp.dropout(0.25, save_mask=save_mask), jp.dense(3))
    jp.testing.assert_gradients_match(net, jp.softmax_cross_entropy(), in_shape=(8, 5), dtype=dtype,
                                      jit=jit, key=jax.random.key(5))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32, jnp.bfloat16, jnp.float16])
def test_both_caches_give_the_same_numbers(jit, dtype):
    x = jax.random.normal(jax.random.key(1), (9, 4, 6), dtype)
    dy = jax.random.normal(jax.random.key(2), x.shape, dtype)          # not all ones
    out = {}
    for save in (True, False):
        layer = jp.dropout(0.4, save_mask=save)

        def run(x, dy, key, layer=layer):
            y, cache = jp.call_forward(layer, (), x, key=key)
            return y, layer.backward(cache, dy)[1]
        out[save] = (jax.jit(run) if jit else run)(x, dy, jax.random.key(11))
    for a, b in zip(out[True], out[False]):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))
    y, dx = out[False]
    kept = np.asarray(y != 0)
    assert 0.4 < kept.mean() < 0.8                                     # a mask was applied
    np.testing.assert_array_equal(np.asarray(dx != 0), kept & np.asarray(dy != 0))
    # dx = mask * dy / keep, exactly as the forward scaled x
    ref = np.where(kept, np.asarray(dy, np.float64) / 0.6, 0.0)
    np.testing.assert_allclose(np.asarray(dx, np.float64), ref, rtol=1e-2 if dtype in (jnp.bfloat16, jnp.float16) else 1e-6)


def test_raw_uint32_key_and_typed_key():
    x = jax.random.normal(jax.random.key(1), (6, 5))
    dy = jax.random.normal(jax.random.key(2), x.shape)
    for key in (jax.random.PRNGKey(4), jax.random.key(4)):
        res = []
        for save in (True, False):
            layer = jp.dropout(0.5, save_mask=save)
            y, cache = jp.call_forward(layer, (), x, key=key)
            res.append((y, layer.backward(cache, dy)[1]))
        np.testing.assert_array_equal(res[0][1], res[1][1])
        np.testing.assert_array_equal(res[0][0], res[1][0])


def test_cache_holds_no_mask():
    x = jnp.ones((32, 16))
    _, cache = jp.call_forward(jp.dropout(0.5, save_mask=False), (), x, key=jax.random.key(0))
    sizes = [a.size for a in jax.tree_util.tree_leaves(cache)
             if not jnp.issubdtype(a.dtype, jax.dtypes.prng_key)]
    assert max(sizes) == 0                                             # only the key and a shape token
    _, cache = jp.call_forward(jp.dropout(0.5), (), x, key=jax.random.key(0))
    assert cache["mask"].shape == x.shape and cache["mask"].dtype == jnp.bool_


@pytest.mark.parametrize("save_mask", [True, False])
def test_eval_and_rate_zero_are_identity(save_mask):
    x = jax.random.normal(jax.random.key(1), (4, 3))
    dy = jax.random.normal(jax.random.key(2), x.shape)
    for layer, ctx in ((jp.dropout(0.5, save_mask=save_mask), {"train": False}),
                       (jp.dropout(0.0, save_mask=save_mask), {"key": jax.random.key(0)})):
        y, cache = jp.call_forward(layer, (), x, **ctx)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(layer.backward(cache, dy)[1], dy)


def test_bad_cotangent_shape_names_the_layer():
    layer = jp.dropout(0.5, save_mask=False)
    _, cache = jp.call_forward(layer, (), jnp.ones((4, 3)), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"dropout\(0.5, save_mask=False\): expected dy of shape \(4, 3\), got \(4, 2\)"):
        layer.backward(cache, jnp.ones((4, 2)))


def test_inside_repeat_matches_serial():
    block = lambda: jp.serial(jp.dense(6), jp.dropout(0.4, save_mask=False))
    rep = repeat(block(), 3)
    ser = jp.serial(block(), block(), block())
    _, p_rep = rep.init(jax.random.key(0), (5, 6))
    p_ser = tuple(jp.unstack_params(p_rep, 3))
    x = jax.random.normal(jax.random.key(1), (5, 6))
    dy = jax.random.normal(jax.random.key(2), x.shape)
    key = jax.random.key(9)

    @jax.jit
    def run(p_rep, p_ser):
        y_r, c_r = jp.call_forward(rep, p_rep, x, key=key)
        y_s, c_s = jp.call_forward(ser, p_ser, x, key=key)
        return y_r, y_s, rep.backward(c_r, dy), ser.backward(c_s, dy)

    y_r, y_s, (g_r, dx_r), (g_s, dx_s) = run(p_rep, p_ser)
    np.testing.assert_allclose(y_r, y_s, rtol=1e-12)
    np.testing.assert_allclose(dx_r, dx_s, rtol=1e-12, atol=1e-15)
    for a, b in zip(jax.tree_util.tree_leaves(tuple(jp.unstack_params(g_r, 3))), jax.tree_util.tree_leaves(g_s)):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15)


def _temp_bytes(save_mask, depth=6, batch=256, width=128):
    layers = []
    for _ in range(depth):
        layers += [jp.dense(width), jp.relu(), jp.dropout(0.5, save_mask=save_mask)]
    net = jp.serial(*layers, jp.dense(10))
    x = jnp.ones((batch, width), jnp.float32)
    y = jnp.zeros((batch,), jnp.int32)
    params = jp.cast_floating(net.init(jax.random.key(0), x.shape)[1], jnp.float32)
    vg = jp.value_and_grad(net, jp.softmax_cross_entropy())
    step = jax.jit(lambda p, k: vg(p, x, y, key=k))
    return step.lower(params, jax.random.key(1)).compile().memory_analysis().temp_size_in_bytes


def test_save_mask_false_uses_less_compiled_memory():
    """The regenerated draw must not be merged with the forward's draw or scheduled in the forward
    pass (then the random bits stay alive across the passes and the step needs more memory)."""
    with_mask, without = _temp_bytes(True), _temp_bytes(False)
    # 6 dropouts of (256, 128): at least one byte per element of each mask saved
    assert without <= with_mask - 6 * 256 * 128, (with_mask, without)

"""The open forward context: a keyword the engine has never heard of (``mask=``)
reaches every layer that declares it, through serial, residual and repeat,
and no layer that does not declare it ever sees it; key splitting and state
threading are unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.core import Layer, declared_keywords
from helpers import init_params


def masked_scale(log=None):
    """A user layer reading a new keyword: y = x * a * m, m = mask (N, D) of 0/1 (None: ones).

    da = sum_n x m dy (D,),  dx = a m dy (N, D). ``log`` collects the mask it saw."""
    def init(key, in_shape):
        return tuple(in_shape), {"a": 1.0 + 0.1 * jax.random.normal(key, in_shape[-1:])}

    def forward(params, x, *, mask=None):
        if log is not None:
            log.append(mask)
        m = jnp.ones(x.shape, x.dtype) if mask is None else mask.astype(x.dtype)
        return x * params["a"][None, :] * m, {"x": x, "a": params["a"], "m": m}

    def backward(cache, dy):
        x, a, m = cache["x"], cache["a"], cache["m"]
        return {"a": jnp.sum(x * m * dy, axis=0)}, a[None, :] * m * dy   # forward was: y = x a m

    return Layer(init, forward, backward, name="masked_scale")


def strict():
    """A layer that declares no keyword: any keyword passed to it is a TypeError."""
    def forward(params, x):
        return jnp.tanh(x), jnp.tanh(x)

    def backward(y, dy):
        return (), dy * (1 - y * y)                      # forward was: y = tanh(x)

    return Layer(lambda key, s: (tuple(s), ()), forward, backward, name="strict")


def spy(log):
    """A layer taking **kwargs: it records every keyword name it receives."""
    def forward(params, x, **ctx):
        log.append(sorted(ctx))
        return x, ()

    return Layer(lambda key, s: (tuple(s), ()), forward, lambda c, dy: ((), dy), name="spy")


def nested(log=None, spy_log=None):
    """serial(residual(serial(...)), repeat(...)) with the new keyword used at every depth."""
    inner = jp.serial(masked_scale(log), strict(), masked_scale(log))
    block = jp.serial(jp.dense(5), masked_scale(log))
    layers = [jp.dense(5), jp.residual(inner), jp.repeat(block, 2), masked_scale(log)]
    if spy_log is not None:
        layers.append(spy(spy_log))
    return jp.serial(*layers, jp.dense(2))


def _data(dtype=jnp.float64):
    x = jax.random.normal(jax.random.key(11), (6, 4), dtype)
    t = jax.random.normal(jax.random.key(12), (6, 2), dtype)
    mask = jax.random.bernoulli(jax.random.key(13), 0.6, (6, 5))
    return x, t, mask


def test_declared_keywords():
    assert declared_keywords(lambda p, x: None) == frozenset()
    assert declared_keywords(lambda p, x, *, key=None, train=True: None) == {"key", "train"}
    assert declared_keywords(lambda p, x, mask=None: None) == {"mask"}
    assert declared_keywords(lambda p, x, **kw: None) is None                  # all of them
    assert declared_keywords(jp.dropout(0.1).forward) == {"key", "train"}
    assert declared_keywords(jp.batch_norm().forward) == {"state", "train"}
    assert declared_keywords(jp.serial(jp.dense(2)).forward) is None


def test_call_forward_passes_only_declared_keywords():
    log = []
    x = jnp.ones((2, 3))
    y, _ = jp.call_forward(strict(), (), x, mask=x, key=jax.random.key(0), train=False, positions=7)
    np.testing.assert_array_equal(y, jnp.tanh(x))          # strict() would raise TypeError otherwise
    jp.call_forward(spy(log), (), x, mask=x, train=False, positions=7)
    assert log == [["mask", "positions", "train"]]


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_new_keyword_reaches_nested_layers(jit):
    log, spy_log = [], []
    net = nested(log, spy_log)
    _, params = init_params(net, jax.random.key(0), (6, 4))
    x, t, mask = _data()
    vg = jp.value_and_grad(net, jp.mse())
    f = jax.jit(lambda p, m: vg(p, x, t, mask=m)) if jit else (lambda p, m: vg(p, x, t, mask=m))
    value, grads = f(params, mask)
    # four masked_scale layers: two in the residual's serial, one in repeat's block, one at the top ...
    assert len(log) == 4 and all(m is not None for m in log)
    assert spy_log == [["mask"]]                                  # ... and **kwargs sees it too

    def cost(p):
        return jp.mse().forward(jp.call_forward(net, p, x, mask=mask)[0], t)[0]
    ref_value, ref_grads = jax.jit(jax.value_and_grad(cost))(params)
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
        assert float(jnp.max(jnp.abs(g - r))) <= 1e-9 * max(float(jnp.max(jnp.abs(r))), 1e-3)
    # the mask matters: without it the value differs
    v_nomask, _ = vg(params, x, t)
    assert abs(float(v_nomask) - float(value)) > 1e-6


@pytest.mark.parametrize("dtype,jit", [(jnp.float64, False), (jnp.float32, True)], ids=["float64-eager", "float32-jit"])
def test_new_keyword_through_the_checkers(dtype, jit):
    net = nested()
    _, params = init_params(net, jax.random.key(0), (6, 4))
    params = jp.cast_floating(params, dtype)
    x, t, mask = _data(dtype)
    report = jp.check_gradients(net, jp.mse(), params, x, t, mask=mask, jit=jit, fd=dtype == jnp.float64)
    assert report.ok, str(report)
    layer = masked_scale()
    _, p = init_params(layer, jax.random.key(1), (6, 5))
    p = jp.cast_floating(p, dtype)
    h = jax.random.normal(jax.random.key(2), (6, 5), dtype)
    assert jp.check_layer(layer, p, h, mask=mask, jit=jit).ok
    # the bridge: custom_vjp with the context fixed
    f = jp.as_custom_vjp(layer, mask=mask)
    g = jax.grad(lambda pp: jnp.sum(f(pp, h) ** 2))(p)
    g_ref = jax.grad(lambda pp: jnp.sum(jp.call_forward(layer, pp, h, mask=mask)[0] ** 2))(p)
    np.testing.assert_allclose(g["a"], g_ref["a"], rtol=1e-9 if dtype == jnp.float64 else 1e-4)


def key_user():
    """A user layer declaring key= without the stochastic flag: it still gets its own key
    (its cache returns the key's data, so the test can see which key it was)."""
    def forward(params, x, *, key=None):
        noise = jax.random.normal(key, x.shape, x.dtype)
        return x + 0.1 * noise, {"key": jax.random.key_data(key)}

    return Layer(lambda k, s: (tuple(s), ()), forward, lambda c, dy: ((), dy), name="key_user")


def test_keys_are_split_per_child_and_states_threaded():
    net = jp.serial(key_user(), jp.dense(3), key_user(), jp.batch_norm(), jp.dropout(0.5),
                    jp.repeat(jp.serial(jp.dense(3), key_user()), 2))
    _, params = init_params(net, jax.random.key(0), (8, 3))
    x = jax.random.normal(jax.random.key(1), (8, 3))
    state = jp.init_state(net, (8, 3))
    run = jax.jit(lambda p, k, s: jp.call_forward(net, p, x, key=k, state=s))
    y1, c1 = run(params, jax.random.key(5), state)
    y2, _ = run(params, jax.random.key(5), state)
    y3, _ = run(params, jax.random.key(6), state)
    np.testing.assert_array_equal(y1, y2)                     # same key, same output
    assert not np.allclose(y1, y3)
    keys = [np.asarray(c1[0]["key"]), np.asarray(c1[2]["key"])] + list(np.asarray(c1[5]["steps"][1]["key"]))
    assert len({k.tobytes() for k in keys}) == 4              # every child, every repeated block: its own key
    new_state = net.update_state(state, c1)                   # the stateful layer got its own state
    assert float(jnp.abs(new_state[3]["mean"]).max()) > 0
    with pytest.raises(ValueError, match=r"expected a state for each of 6 layers, got 2"):
        jp.call_forward(net, params, x, key=jax.random.key(5), state=state[:2])


def test_train_flag_passes_on_unchanged():
    net = jp.serial(jp.dense(4), jp.dropout(0.5), jp.residual(jp.serial(jp.dense(4), jp.dropout(0.9))))
    _, params = init_params(net, jax.random.key(0), (5, 3))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    y_eval, _ = jp.call_forward(net, params, x, train=False, mask=None)     # no key needed
    h = x @ params[0]["w"] + params[0]["b"][None, :]
    inner = h @ params[2][0]["w"] + params[2][0]["b"][None, :]
    np.testing.assert_allclose(y_eval, h + inner, rtol=1e-12)
    with pytest.raises(ValueError, match=r"dropout\(0.5\): training mode needs a PRNG key"):
        jp.call_forward(net, params, x)

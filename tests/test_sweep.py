"""The one sweep (jaxprop.grad.forward_backward): what value_and_grad, mixed
precision and check_gradients share; its trace-time checks of a backward's
grads and dx; and the non-float input rule (integer token ids, dx = None)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
import jaxprop.check
from jaxprop.core import Layer, shape_token, token_shape
from jaxprop.grad import Sweep, forward_backward
from helpers import init_params


def _setup(net, in_shape=(6, 4), n_out=3, dtype=jnp.float64):
    _, params = init_params(net, jax.random.key(0), in_shape)
    params = jp.cast_floating(params, dtype)
    x = jax.random.normal(jax.random.key(1), in_shape, dtype)
    t = jax.random.normal(jax.random.key(2), in_shape[:-1] + (n_out,), dtype)
    return params, x, t


def test_forward_backward_is_value_and_grad():
    net = jp.serial(jp.dense(5), jp.tanh(), jp.dense(3))
    params, x, t = _setup(net)
    sweep = jax.jit(lambda p: forward_backward(net, jp.mse(), p, x, t))(params)
    assert isinstance(sweep, Sweep)
    value, grads = jax.jit(jp.value_and_grad(net, jp.mse()))(params, x, t)
    np.testing.assert_array_equal(sweep.value, value)
    for a, b in zip(jax.tree_util.tree_leaves(sweep.grads), jax.tree_util.tree_leaves(grads)):
        np.testing.assert_array_equal(a, b)
    assert sweep.dx.shape == x.shape and sweep.pred.shape == t.shape
    # dvalue scales every gradient (the loss scale of mixed precision)
    scaled = jax.jit(lambda p: forward_backward(net, jp.mse(), p, x, t, dvalue=4.0))(params)
    for a, b in zip(jax.tree_util.tree_leaves((scaled.grads, scaled.dx)),
                    jax.tree_util.tree_leaves((sweep.grads, sweep.dx))):
        np.testing.assert_allclose(a, 4.0 * b, rtol=1e-14)


def test_check_gradients_runs_the_sweep(monkeypatch):
    """What is checked is what trains: check_gradients' hand side is forward_backward."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward_backward(*args, **kwargs)

    monkeypatch.setattr(jaxprop.check, "forward_backward", spy)
    net = jp.serial(jp.dense(5), jp.dropout(0.3), jp.dense(3))
    params, x, t = _setup(net)
    assert jp.check_gradients(net, jp.mse(), params, x, t, key=jax.random.key(3), fd=False).ok
    assert len(calls) == 1 and "key" in calls[0]


def where_loss(log):
    """mse that also takes where= (a (N,) mask of examples that count); logs what it got."""
    base = jp.mse()

    def forward(pred, target, where=None):
        log.append(where)
        w = jnp.ones(pred.shape[:1], pred.dtype) if where is None else where.astype(pred.dtype)
        r = (pred - target) * w[:, None]
        return jnp.sum(r * r) / pred.shape[0], {"r": r, "w": w}

    def backward(cache, dvalue=1.0):
        return 2 * jnp.asarray(dvalue, cache["r"].dtype) / cache["r"].shape[0] * cache["r"] * cache["w"][:, None]

    return jp.Loss(forward, backward, "where_mse")


def test_where_goes_to_the_loss_only_when_given():
    net = jp.serial(jp.dense(3))
    params, x, t = _setup(net)
    # a loss without where= keeps working (where=None is not passed)
    jp.value_and_grad(net, jp.mse())(params, x, t)
    jp.mixed_value_and_grad(net, jp.mse(), compute_dtype=jnp.float32)(params, x, t)
    log = []
    where = jnp.array([True, False, True, True, False, True])
    value, grads = jp.value_and_grad(net, where_loss(log))(params, x, t, where=where)
    assert log[-1] is where
    ref = jax.grad(lambda p: where_loss([]).forward(net.forward(p, x)[0], t, where=where)[0])(params)
    np.testing.assert_allclose(grads[0]["w"], ref[0]["w"], rtol=1e-10)
    assert jp.check_gradients(net, where_loss([]), params, x, t, where=where, fd=False).ok


# ---- a backward whose grads or dx do not fit: an error at trace time, naming the layer ----------

def bad_scale(kind):
    """y = x * a with a (D,); the backward returns a wrong thing depending on ``kind``."""
    def init(key, in_shape):
        return tuple(in_shape), {"a": 1.0 + 0.1 * jax.random.normal(key, in_shape[-1:])}

    def forward(params, x):
        return x * params["a"][None, :], (x, params["a"])

    def backward(cache, dy):
        x, a = cache
        da = jnp.sum(x * dy, axis=0)
        dx = dy * a[None, :]
        if kind == "shape":
            return {"a": da[None, :]}, dx                        # (1, D) instead of (D,)
        if kind == "structure":
            return {"scale": da}, dx
        if kind == "dtype":
            return {"a": da.astype(jnp.float32)}, dx
        if kind == "dx_shape":
            return {"a": da}, dx[:, :1]
        if kind == "dx_none":
            return {"a": da}, None
        return {"a": da}, dx

    return Layer(init, forward, backward, name=f"bad_scale_{kind}")


@pytest.mark.parametrize("kind,message", [
    pytest.param("shape", r"bad_scale_shape: backward returned grads\['a'\] of shape \(1, 4\) float64, "
                          r"expected \(4,\) float64", id="shape"),
    pytest.param("structure", r"bad_scale_structure: backward returned grads with structure .*"
                              r"missing grads\['a'\]; unexpected grads\['scale'\]", id="structure"),
    pytest.param("dtype", r"bad_scale_dtype: backward returned grads\['a'\] of shape \(4,\) float32, "
                          r"expected \(4,\) float64", id="dtype"),
    pytest.param("dx_shape", r"bad_scale_dx_shape: backward returned dx of shape \(6, 1\) float64, "
                             r"expected \(6, 4\) float64", id="dx_shape"),
    pytest.param("dx_none", r"bad_scale_dx_none: backward returned dx=None for a floating-point input",
                 id="dx_none"),
])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_bad_backward_is_an_error_naming_the_layer(kind, message, jit):
    layer = bad_scale(kind)
    _, params = init_params(layer, jax.random.key(0), (6, 4))
    x = jax.random.normal(jax.random.key(1), (6, 4))
    t = jax.random.normal(jax.random.key(2), (6, 4))
    vg = jp.value_and_grad(layer, jp.mse())
    with pytest.raises(ValueError, match=message):
        (jax.jit(vg) if jit else vg)(params, x, t)


def test_bad_grads_inside_a_network_name_the_leaf():
    net = jp.serial(jp.dense(4), bad_scale("shape"), jp.dense(3))
    params, x, t = _setup(net)
    with pytest.raises(ValueError, match=r"serial\(dense\(4\), bad_scale_shape, dense\(3\)\): backward returned "
                                         r"grads\[1\]\['a'\] of shape \(1, 4\)"):
        jax.jit(jp.value_and_grad(net, jp.mse()))(params, x, t)
    with pytest.raises(ValueError, match=r"grads\[1\]\['a'\] of shape \(1, 4\)"):
        jp.mixed_value_and_grad(net, jp.mse(), compute_dtype=jnp.float32)(params, x, t)
    with pytest.raises(ValueError, match=r"grads\[1\]\['a'\] of shape \(1, 4\)"):
        jp.check_gradients(net, jp.mse(), params, x, t)
    with pytest.raises(ValueError, match=r"check_layer: bad_scale_shape: backward returned grads\['a'\]"):
        jp.check_layer(bad_scale("shape"), params[1], jax.random.normal(jax.random.key(3), (6, 4)))
    assert jp.check_layer(bad_scale("ok"), params[1], jax.random.normal(jax.random.key(3), (6, 4))).ok


# ---- non-float inputs: integer token ids, dx = None ------------------------------------------------

def lookup(vocab, dim):
    """A user embedding: y[n, ...] = w[ids[n, ...]], ids integer (N, ...) -> y (N, ..., dim).

    dw = scatter-add of dy into the rows the ids picked (vocab, dim); no dx (ids are not floats)."""
    def init(key, in_shape):
        return tuple(in_shape) + (dim,), {"w": jax.random.normal(key, (vocab, dim))}

    def forward(params, ids):
        return params["w"][ids], {"ids": ids, "w": shape_token(params["w"])}

    def backward(cache, dy):
        w = cache["w"]
        dw = jnp.zeros(token_shape(w), dy.dtype).at[cache["ids"]].add(dy)   # forward was: y = w[ids]
        return {"w": dw}, None

    return Layer(init, forward, backward, name="lookup")


def stop():
    """A float layer whose backward (wrongly) returns dx = None."""
    return Layer(lambda k, s: (tuple(s), ()), lambda p, x: (x, ()), lambda c, dy: ((), None), name="stop")


def _ids_setup(dtype, shape=(6, 5)):
    net = jp.serial(lookup(7, 4), jp.tanh(), jp.dense(3))
    ids = jax.random.randint(jax.random.key(1), shape, 0, 7)
    _, params = init_params(net, jax.random.key(0), shape)
    params = jp.cast_floating(params, dtype)
    t = jax.random.normal(jax.random.key(2), shape + (3,), dtype)
    return net, params, ids, t


@pytest.mark.parametrize("dtype,jit", [(jnp.float64, False), (jnp.float64, True), (jnp.float32, True)],
                         ids=["float64-eager", "float64-jit", "float32-jit"])
def test_integer_ids_against_jax_grad(dtype, jit):
    net, params, ids, t = _ids_setup(dtype)
    loss = jp.mse()
    f = (lambda p: forward_backward(net, loss, p, ids, t))
    sweep = (jax.jit(f) if jit else f)(params)
    assert sweep.dx is None
    ref = jax.jit(jax.grad(lambda p: loss.forward(jp.call_forward(net, p, ids)[0], t)[0]))(params)
    tol = 1e-9 if dtype == jnp.float64 else 1e-4
    for g, r in zip(jax.tree_util.tree_leaves(sweep.grads), jax.tree_util.tree_leaves(ref)):
        assert g.dtype == dtype
        assert float(jnp.max(jnp.abs(g - r))) <= tol * float(jnp.max(jnp.abs(r)))
    report = jp.check_gradients(net, loss, params, ids, t, jit=jit, fd=jit and dtype == jnp.float64)
    assert report.ok, str(report)
    assert all(r.name.startswith("['params']") for r in report.rows)       # params only, no input row
    layer_report = jp.check_layer(lookup(7, 4), params[0], ids, jit=jit)
    assert layer_report.ok and [r.name for r in layer_report.rows] == ["['params']['w']"]


def test_integer_ids_through_the_bridge():
    layer = lookup(7, 4)
    _, params = init_params(layer, jax.random.key(0), (6,))
    ids = jax.random.randint(jax.random.key(1), (6,), 0, 7)
    dy = jax.random.normal(jax.random.key(2), (6, 4))
    f = jp.as_custom_vjp(layer)
    g = jax.grad(lambda p: jnp.vdot(dy, f(p, ids)))(params)
    g_ref = jax.grad(lambda p: jnp.vdot(dy, p["w"][ids]))(params)
    np.testing.assert_allclose(g["w"], g_ref["w"], rtol=1e-12)


def test_bridge_passes_jax_check_vjp():
    """The custom_vjp bridge of a network is a correct VJP for jax's own checker (numerical
    directional derivatives), in float64; the registry's check_bridge compares it with the hand
    backward on every case."""
    import jax.test_util

    net = jp.serial(jp.dense(5), jp.tanh(), jp.layer_norm(), jp.dense(3))
    params, x, _ = _setup(net)
    f = jax.jit(jp.as_custom_vjp(net))
    jax.test_util.check_vjp(f, lambda p, xx: jax.vjp(f, p, xx), (params, x), atol=1e-6, rtol=1e-6, eps=1e-5)


def test_dx_none_from_a_later_layer_is_an_error():
    net = jp.serial(jp.dense(4), stop(), jp.dense(3))
    params, x, t = _setup(net)
    with pytest.raises(ValueError, match=r"serial\(dense\(4\), stop, dense\(3\)\): layer 1 \(stop\) returned "
                                         r"dx=None, but its input is the output of layer 0 \(dense\(4\)\)"):
        jp.value_and_grad(net, jp.mse())(params, x, t)
    with pytest.raises(ValueError, match=r"residual\(stop\): the block \(stop\) returned dx=None"):
        jp.residual(stop()).backward({"block": (), "y_shape": shape_token(x)}, x)
    rep = jp.repeat(stop(), 2)
    p_rep, x4, t4 = _setup(rep, (6, 4), 4)
    with pytest.raises(ValueError, match=r"repeat\(stop, 2\): the block \(stop\) returned dx=None"):
        jp.value_and_grad(rep, jp.mse())(p_rep, x4, t4)
    # a top-level layer that returns dx=None for a float input: the sweep says so
    with pytest.raises(ValueError, match=r"stop: backward returned dx=None for a floating-point input"):
        jp.value_and_grad(stop(), jp.mse())((), x4, t4)

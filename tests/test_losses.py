"""Losses: hand-written dJ/dpred against jax.grad, stability at |z| = 1000, errors."""
import jax
import jax.numpy as jnp
import jax.test_util
import numpy as np
import pytest

import jaxprop as jp


def make_targets(name, key, pred):
    n, c = pred.shape
    if name == "labels":
        return jax.random.randint(key, (n,), 0, c)
    if name == "probs":
        return jax.nn.softmax(jax.random.normal(key, (n, c), pred.dtype))
    if name == "binary":
        return jax.random.uniform(key, (n, c), pred.dtype)
    return jax.random.normal(key, (n, c), pred.dtype)


LOSSES = [
    ("mse", jp.mse, "real"),
    ("xent_labels", jp.softmax_cross_entropy, "labels"),
    ("xent_smooth", lambda: jp.softmax_cross_entropy(label_smoothing=0.1), "labels"),
    ("xent_probs", jp.softmax_cross_entropy, "probs"),
    ("xent_probs_smooth", lambda: jp.softmax_cross_entropy(label_smoothing=0.2), "probs"),
    ("bce", jp.sigmoid_binary_cross_entropy, "binary"),
]


def reference_value(name, pred, t):
    """Independent textbook formulas (not the code under test)."""
    n = pred.shape[0]
    if name == "mse":
        return jnp.sum((pred - t) ** 2) / n
    if name.startswith("xent"):
        c = pred.shape[1]
        q = jax.nn.one_hot(t, c, dtype=pred.dtype) if t.ndim == 1 else t
        eps = {"xent_smooth": 0.1, "xent_probs_smooth": 0.2}.get(name, 0.0)
        q = (1 - eps) * q + eps / c
        return -jnp.sum(q * jax.nn.log_softmax(pred)) / n
    s = jax.nn.sigmoid(pred)
    return -jnp.sum(t * jnp.log(s) + (1 - t) * jnp.log1p(-s)) / n


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name,make,kind", LOSSES, ids=[x[0] for x in LOSSES])
def test_loss_gradient_matches_autodiff(name, make, kind, dtype, jit):
    loss = make()
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    pred = jax.random.normal(k1, (6, 5), dtype) * 2
    t = make_targets(kind, k2, pred)
    dvalue = jax.random.normal(k3, (), dtype)           # random upstream scalar, not 1
    value, cache = loss.forward(pred, t)
    np.testing.assert_allclose(value, reference_value(name, pred, t), rtol=1e-12 if dtype == jnp.float64 else 1e-5)
    bwd = jax.jit(loss.backward) if jit else loss.backward
    dpred = bwd(cache, dvalue)
    ref = jax.grad(lambda p: reference_value(name, p, t))(pred) * dvalue
    tol = 1e-10 if dtype == jnp.float64 else 1e-5
    err = float(jnp.max(jnp.abs(dpred - ref)) / jnp.max(jnp.abs(ref)))
    assert err <= tol, err


@pytest.mark.parametrize("name,make,kind", LOSSES, ids=[x[0] for x in LOSSES])
def test_loss_bridge_check_vjp(name, make, kind):
    loss = make()
    pred = jax.random.normal(jax.random.key(1), (4, 3))
    t = make_targets(kind, jax.random.key(2), pred)
    f = jp.as_custom_vjp(loss)
    if kind == "labels":
        g = jax.grad(f)(pred, t)
        np.testing.assert_allclose(g, jax.grad(lambda p: reference_value(name, p, t))(pred), rtol=1e-12)
    else:   # float targets: the bridge differentiates both arguments by hand
        jax.test_util.check_vjp(f, lambda a, b: jax.vjp(f, a, b), (pred, t), atol=1e-7, rtol=1e-7, eps=1e-6)


def test_softmax_cross_entropy_extreme_logits():
    loss = jp.softmax_cross_entropy()
    z = jnp.array([[1000.0, -1000.0, 0.0], [-1000.0, 1000.0, 999.0]])
    y = jnp.array([1, 2])
    value, cache = loss.forward(z, y)
    dz = loss.backward(cache)
    # stable reference: log p = z - logsumexp(z); row 0 loses 2000, row 1 loses ~1.3133
    expected = (2000.0 + (1000.0 - 999.0 + np.log1p(np.exp(-1.0)))) / 2
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    assert bool(jnp.all(jnp.isfinite(dz)))
    ref = jax.grad(lambda p: -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(p), y[:, None], 1)))(z)
    np.testing.assert_allclose(dz, ref, atol=1e-15)


def test_sigmoid_bce_extreme_logits():
    loss = jp.sigmoid_binary_cross_entropy()
    z = jnp.array([[1000.0, -1000.0], [1000.0, -1000.0]])
    t = jnp.array([[0.0, 1.0], [1.0, 0.0]])
    value, cache = loss.forward(z, t)
    np.testing.assert_allclose(value, 2000.0 / 2, rtol=1e-12)   # two wrong by 1000 each, two right
    dz = loss.backward(cache)
    np.testing.assert_allclose(dz, jnp.array([[0.5, -0.5], [0.0, 0.0]]), atol=1e-15)
    for dt in (jnp.float32, jnp.float64):
        v, c = loss.forward(z.astype(dt), t.astype(dt))
        assert bool(jnp.isfinite(v)) and bool(jnp.all(jnp.isfinite(loss.backward(c))))


def test_softplus_and_sigmoid_layers_extreme():
    x = jnp.array([[-1000.0, -30.0, 0.0, 30.0, 1000.0]])
    for layer, ref in [(jp.softplus(), jax.nn.softplus), (jp.sigmoid(), jax.nn.sigmoid)]:
        y, cache = layer.forward((), x)
        np.testing.assert_allclose(y, ref(x), rtol=1e-14)
        _, dx = layer.backward(cache, jnp.ones_like(x) * 0.7)
        np.testing.assert_allclose(dx, jax.grad(lambda a: 0.7 * jnp.sum(ref(a)))(x), rtol=1e-14, atol=1e-300)
        assert bool(jnp.all(jnp.isfinite(dx)))
    y, _ = jp.softplus().forward((), x)
    assert float(y[0, -1]) == 1000.0


def test_log_softmax_layer_extreme():
    x = jnp.array([[1000.0, -1000.0, 0.0]])
    y, cache = jp.log_softmax().forward((), x)
    dy = jnp.array([[0.3, -1.2, 0.5]])
    _, dx = jp.log_softmax().backward(cache, dy)
    ref = jax.vjp(jax.nn.log_softmax, x)[1](dy)[0]
    np.testing.assert_allclose(dx, ref, atol=1e-14)
    assert bool(jnp.all(jnp.isfinite(y)))


# ---- error paths -------------------------------------------------------------------------------

def test_label_batch_mismatch():
    with pytest.raises(ValueError, match=r"softmax_cross_entropy.*\(3,\).*\(4,\)|softmax_cross_entropy.*\(4, 5\)"):
        jp.softmax_cross_entropy().forward(jnp.zeros((4, 5)), jnp.zeros((3,), jnp.int32))


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*\[0, 7\]"):
        jp.softmax_cross_entropy().forward(jnp.zeros((2, 5)), jnp.array([0, 7]))
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        jp.softmax_cross_entropy().forward(jnp.zeros((2, 5)), jnp.array([-1, 2]))


def test_mse_shape_mismatch_is_not_broadcast():
    with pytest.raises(ValueError, match=r"mse: expected target of shape \(4, 1\).*got \(4,\)"):
        jp.mse().forward(jnp.zeros((4, 1)), jnp.zeros((4,)))


def test_bce_batch_mismatch():
    with pytest.raises(ValueError, match=r"sigmoid_binary_cross_entropy: batch size of targets \(3, 2\)"):
        jp.sigmoid_binary_cross_entropy().forward(jnp.zeros((4, 2)), jnp.zeros((3, 2)))


def test_integer_predictions_rejected():
    with pytest.raises(ValueError, match="floating-point"):
        jp.mse().forward(jnp.zeros((4, 2), jnp.int32), jnp.zeros((4, 2), jnp.int32))


def test_bad_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        jp.softmax_cross_entropy(label_smoothing=1.5)


def test_bce_gradient_at_exactly_zero_logit():
    """z = 0 exactly (e.g. behind a dead relu): dz = (sigmoid(0) - t)/N = 0.5 - t, and the
    autodiff reference of the forward must agree (a max/abs formulation gets 0 there)."""
    loss = jp.sigmoid_binary_cross_entropy()
    z, t = jnp.zeros((2, 1)), jnp.array([[0.0], [1.0]])
    dz = loss.backward(loss.forward(z, t)[1])
    np.testing.assert_array_equal(dz, jnp.array([[0.25], [-0.25]]))
    np.testing.assert_array_equal(jax.grad(lambda a: loss.forward(a, t)[0])(z), dz)

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
    ("mse_mean", lambda: jp.mse(reduction="mean"), "real"),
    ("mse_sum", lambda: jp.mse(reduction="sum"), "real"),
    ("xent_labels", jp.softmax_cross_entropy, "labels"),
    ("xent_smooth", lambda: jp.softmax_cross_entropy(label_smoothing=0.1), "labels"),
    ("xent_probs", jp.softmax_cross_entropy, "probs"),
    ("xent_probs_smooth", lambda: jp.softmax_cross_entropy(label_smoothing=0.2), "probs"),
    ("bce", jp.sigmoid_binary_cross_entropy, "binary"),
    ("bce_mean", lambda: jp.sigmoid_binary_cross_entropy(reduction="mean"), "binary"),
    ("bce_sum", lambda: jp.sigmoid_binary_cross_entropy(reduction="sum"), "binary"),
]


def reference_value(name, pred, t):
    """Independent textbook formulas (not the code under test): "mean" is jnp.mean (optax's convention
    followed by a mean), "sum" jnp.sum, the default the sum over outputs over the batch size."""
    n = pred.shape[0]
    reduce = {"mean": jnp.mean, "sum": jnp.sum}.get(name.rsplit("_", 1)[-1], lambda a: jnp.sum(a) / n)
    if name.startswith("mse"):
        return reduce((pred - t) ** 2)
    if name.startswith("xent"):
        c = pred.shape[1]
        q = jax.nn.one_hot(t, c, dtype=pred.dtype) if t.ndim == 1 else t
        eps = {"xent_smooth": 0.1, "xent_probs_smooth": 0.2}.get(name, 0.0)
        q = (1 - eps) * q + eps / c
        return -jnp.sum(q * jax.nn.log_softmax(pred)) / n
    s = jax.nn.sigmoid(pred)
    return reduce(-(t * jnp.log(s) + (1 - t) * jnp.log1p(-s)))


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
    else:   # float targets: the bridge differentiates both arguments by hand. Jitted: check_vjp's
        # perturbed targets leave the simplex, which a concrete forward would (rightly) reject
        f = jax.jit(f)
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


def test_bce_and_mse_reductions_against_optax_convention():
    """reduction="mean" is the element mean of PyTorch/optax; "batch" (default) is the design notes' J."""
    k1, k2 = jax.random.split(jax.random.key(4))
    z = jax.random.normal(k1, (6, 3))
    t = jax.random.uniform(k2, (6, 3))
    bce_elems = jnp.logaddexp(z, 0.0) - t * z            # optax.sigmoid_binary_cross_entropy's formula
    for red, ref in [("batch", jnp.sum(bce_elems) / 6), ("mean", jnp.mean(bce_elems)), ("sum", jnp.sum(bce_elems))]:
        np.testing.assert_allclose(jp.sigmoid_binary_cross_entropy(reduction=red).forward(z, t)[0], ref, rtol=1e-14)
        np.testing.assert_allclose(jp.mse(reduction=red).forward(z, t)[0],
                                   {"batch": jnp.sum((z - t) ** 2) / 6, "mean": jnp.mean((z - t) ** 2),
                                    "sum": jnp.sum((z - t) ** 2)}[red], rtol=1e-14)


@pytest.mark.parametrize("make", [jp.mse, jp.sigmoid_binary_cross_entropy], ids=["mse", "bce"])
def test_bad_reduction_name(make):
    with pytest.raises(ValueError, match=r"reduction must be one of 'batch', 'mean', 'sum', got 'avg'"):
        make(reduction="avg")


# ---- softmax cross-entropy over (N, ..., C), with a mask -----------------------------------------

def _xent_reference(z, labels, w=None, eps=0.0):
    """Independent: log_softmax + take_along_axis, mean over the counted positions."""
    c = z.shape[-1]
    logp = jax.nn.log_softmax(z, axis=-1)
    q = (1 - eps) * jax.nn.one_hot(labels, c, dtype=z.dtype) + eps / c
    per = -jnp.sum(q * logp, axis=-1)
    if w is None:
        return jnp.mean(per)
    return jnp.sum(jnp.where(w, per, 0.0)) / jnp.sum(w)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("eps,masked", [(0.0, False), (0.0, True), (0.1, True)], ids=["all", "where", "smooth_where"])
def test_xent_sequence_logits_and_mask_match_autodiff(eps, masked, dtype):
    """Logits (N, T, C), labels (N, T): J the mean over the N*T positions (or over the counted ones),
    dz against jax.grad of an independent formula, zero on masked positions (which hold label -100).
    Eager and jitted."""
    loss = jp.softmax_cross_entropy(label_smoothing=eps)
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    z = jax.random.normal(k1, (3, 4, 5), dtype) * 2
    labels = jax.random.randint(k2, (3, 4), 0, 5)
    w = jax.random.bernoulli(k3, 0.6, (3, 4)).at[0, 0].set(True) if masked else None
    if masked:
        labels = jnp.where(w, labels, -100)          # padding label, never read
    dvalue = jax.random.normal(k4, (), dtype)
    ref_labels = jnp.where(w, labels, 0) if masked else labels
    ref_value = _xent_reference(z, ref_labels, w, eps)
    ref = jax.grad(lambda a: _xent_reference(a, ref_labels, w, eps))(z) * dvalue
    tol = 1e-12 if dtype == jnp.float64 else 2e-6
    for jit in (False, True):
        fwd = jax.jit(loss.forward) if jit else loss.forward
        value, cache = fwd(z, labels, w)
        dz = (jax.jit(loss.backward) if jit else loss.backward)(cache, dvalue)
        np.testing.assert_allclose(value, ref_value, rtol=tol)
        np.testing.assert_allclose(dz, ref, rtol=tol, atol=tol * float(jnp.max(jnp.abs(ref))))
        if masked:
            assert bool(jnp.all(dz[~w] == 0))


def test_xent_probability_targets_sequence_and_mask():
    loss = jp.softmax_cross_entropy()
    k1, k2 = jax.random.split(jax.random.key(2))
    z = jax.random.normal(k1, (2, 3, 4))
    q = jax.nn.softmax(jax.random.normal(k2, (2, 3, 4)))
    w = jnp.array([[True, False, True], [True, True, False]])
    ref = lambda a: jnp.sum(jnp.where(w, -jnp.sum(q * jax.nn.log_softmax(a), -1), 0.0)) / 4
    value, cache = loss.forward(z, q, where=w)
    np.testing.assert_allclose(value, ref(z), rtol=1e-13)
    np.testing.assert_allclose(loss.backward(cache, 0.7), 0.7 * jax.grad(ref)(z), atol=1e-15)
    value, cache = loss.forward(z, q)
    np.testing.assert_allclose(value, -jnp.mean(jnp.sum(q * jax.nn.log_softmax(z), -1)), rtol=1e-13)


def test_xent_mask_counting_nothing_gives_zero_not_nan():
    loss = jp.softmax_cross_entropy()
    z = jax.random.normal(jax.random.key(0), (2, 3, 4))
    w = jnp.zeros((2, 3), bool)
    for fwd in (loss.forward, jax.jit(loss.forward)):
        value, cache = fwd(z, jnp.zeros((2, 3), jnp.int32), w)
        assert float(value) == 0.0
        np.testing.assert_array_equal(loss.backward(cache), jnp.zeros_like(z))


def test_xent_mask_must_be_boolean_of_leading_shape():
    loss = jp.softmax_cross_entropy()
    z, y = jnp.zeros((2, 3, 4)), jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"softmax_cross_entropy: expected a boolean where mask of shape \(2, 3\)"):
        loss.forward(z, y, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"boolean where mask of shape \(2, 3\).*of shape \(2,\)"):
        loss.forward(z, y, where=jnp.ones((2,), bool))
    with pytest.raises(ValueError, match=r"integer labels of shape \(2, 3\) for logits \(2, 3, 4\), got \(2,\)"):
        loss.forward(z, jnp.zeros((2,), jnp.int32))


def test_xent_two_dimensional_numbers_bit_identical():
    """(N, C) logits and labels: the same floating-point operations, in the same order, as before
    the (N, ..., C) generalisation (the default training job's params_fingerprint depends on it)."""
    loss = jp.softmax_cross_entropy()
    k1, k2 = jax.random.split(jax.random.key(3))
    for dtype in (jnp.float32,):                     # the default training job's dtype
        z = jax.random.normal(k1, (64, 10), dtype) * 3
        y = jax.random.randint(k2, (64,), 0, 10)
        dv = jnp.asarray(0.37, dtype)

        def before(z, y):
            logp = jax.nn.log_softmax(z, axis=-1)
            t = jax.nn.one_hot(y, 10, dtype=dtype)
            return -jnp.sum(t * logp) / 64, (jnp.exp(logp) - t) * (jnp.asarray(dv, dtype) / 64)

        def after(z, y):
            value, cache = loss.forward(z, y)
            return value, loss.backward(cache, dv)

        for f, g in [(before, after), (jax.jit(before), jax.jit(after))]:
            (v0, d0), (v1, d1) = f(z, y), g(z, y)
            assert np.asarray(v0).tobytes() == np.asarray(v1).tobytes()
            np.testing.assert_array_equal(np.asarray(d0).view(np.uint8), np.asarray(d1).view(np.uint8))


# ---- issue 16: no silent wrong answers -----------------------------------------------------------

def test_out_of_range_labels_under_jit_give_nan():
    """Under jit the labels' values are unknown at trace time: a label outside [0, C) makes J and dz
    NaN (before: silently a probability-0 one-hot row, a finite loss)."""
    loss = jp.softmax_cross_entropy()
    z = jax.random.normal(jax.random.key(0), (4, 5))
    step = jax.jit(lambda z, y: (lambda v, c: (v, loss.backward(c)))(*loss.forward(z, y)))
    for bad in ([0, 7, 1, 2], [0, -1, 1, 2], [5, 0, 0, 0]):
        value, dz = step(z, jnp.array(bad))
        assert bool(jnp.isnan(value)), bad
        assert bool(jnp.all(jnp.isnan(dz))), bad
    value, dz = step(z, jnp.array([0, 4, 1, 2]))
    eager_value, cache = loss.forward(z, jnp.array([0, 4, 1, 2]))
    np.testing.assert_allclose(value, eager_value, rtol=1e-14)
    np.testing.assert_allclose(dz, loss.backward(cache), rtol=1e-14)
    # masked positions may hold any label (padding), even under jit
    w = jnp.array([True, False, True, True])
    value, _ = jax.jit(loss.forward)(z, jnp.array([0, -100, 1, 2]), w)
    assert bool(jnp.isfinite(value))
    value, _ = jax.jit(loss.forward)(z, jnp.array([0, 1, 9, 2]), w)
    assert bool(jnp.isnan(value))


def test_out_of_range_labels_eager_respect_mask():
    loss = jp.softmax_cross_entropy()
    z = jnp.zeros((3, 5))
    loss.forward(z, jnp.array([0, -100, 4]), where=jnp.array([True, False, True]))   # padding: fine
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\).*\[-100, 4\]"):
        loss.forward(z, jnp.array([0, -100, 4]), where=jnp.array([True, True, True]))


@pytest.mark.parametrize("target", [
    "normal", "negative", "sums_to_two"])
def test_float_targets_must_be_probabilities(target):
    """Random normals used to give a loss of -3.43 without complaint."""
    loss = jp.softmax_cross_entropy()
    z = jax.random.normal(jax.random.key(0), (4, 3))
    t = {"normal": jax.random.normal(jax.random.key(1), (4, 3)),
         "negative": jnp.array([[1.2, -0.2, 0.0]] * 4),
         "sums_to_two": jnp.full((4, 3), 2 / 3)}[target]
    with pytest.raises(ValueError, match="softmax_cross_entropy: float targets for logits \\(4, 3\\) must be "
                                         "probabilities"):
        loss.forward(z, t)


def test_float_probability_targets_accepted_within_rounding():
    loss = jp.softmax_cross_entropy()
    for dtype in (jnp.float32, jnp.float64):
        z = jax.random.normal(jax.random.key(0), (8, 1000), dtype)
        q = jax.nn.softmax(jax.random.normal(jax.random.key(1), (8, 1000), dtype) * 5)
        assert bool(jnp.isfinite(loss.forward(z, q)[0]))
        assert bool(jnp.isfinite(loss.forward(z, jax.nn.one_hot(jnp.arange(8), 1000, dtype=dtype))[0]))
    jax.jit(loss.forward)(z, -q)              # traced targets: no check (values unknown)


def test_bce_targets_outside_unit_interval_rejected():
    loss = jp.sigmoid_binary_cross_entropy()
    z = jnp.zeros((3, 2))
    for bad in (jnp.array([[0.0, 1.0], [2.0, 0.5], [0.0, 0.0]]), jnp.array([[0.0, -0.1], [1.0, 0.5], [0.0, 0.0]])):
        with pytest.raises(ValueError, match=r"sigmoid_binary_cross_entropy: targets must lie in \[0, 1\]"):
            loss.forward(z, bad)
    loss.forward(z, jnp.array([[0, 1], [1, 0], [1, 1]]))     # integer 0/1 targets are fine


@pytest.mark.parametrize("name,make,kind", LOSSES, ids=[x[0] for x in LOSSES])
def test_non_scalar_dvalue_rejected(name, make, kind):
    """A (N,) dvalue used to broadcast into a wrong dpred."""
    loss = make()
    pred = jax.random.normal(jax.random.key(0), (4, 3))
    _, cache = loss.forward(pred, make_targets(kind, jax.random.key(1), pred))
    with pytest.raises(ValueError, match=rf"{loss.name}: dvalue must be a scalar.*\(4,\)"):
        loss.backward(cache, jnp.ones((4,)))
    if loss.backward_target is not None and kind != "labels":
        with pytest.raises(ValueError, match="dvalue must be a scalar"):
            loss.backward_target(cache, jnp.ones((4, 1)))
    loss.backward(cache, jnp.asarray(2.0))                  # a 0-d array is a scalar


@pytest.mark.parametrize("name,make,kind", LOSSES, ids=[x[0] for x in LOSSES])
def test_empty_batch_rejected(name, make, kind):
    """N = 0 used to give a NaN loss (0/0)."""
    loss = make()
    pred = jnp.zeros((0, 3))
    with pytest.raises(ValueError, match=rf"{loss.name}: empty batch \(N = 0\)"):
        loss.forward(pred, make_targets(kind, jax.random.key(1), pred))

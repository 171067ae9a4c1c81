"""Per-example gradients, their norms and DP-SGD against jax.vmap(jax.grad) and optax.

Registry-driven: every case of ``jaxprop.testing.CASES`` whose layer has a
per-example rule is checked against autodiff of the same forward; a case that
refuses must be one that mixes examples or has no rule, and must say so
(``PerExampleUnsupported`` naming the layer).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprop as jp
from jaxprop import per_example as pe
from jaxprop.core import PerExampleUnsupported, call_forward
from jaxprop.testing import CASES, setup

# cases that must have per-example gradients (a refusal is a bug); the others may refuse cleanly
MUST_SUPPORT = {
    "dense", "dense_nobias", "dense_3d", "identity", "sigmoid", "tanh", "relu", "relu_save_output",
    "leaky_relu", "elu", "softplus", "gelu", "gelu_tanh", "silu", "softmax", "log_softmax", "flatten",
    "reshape", "dropout_train", "dropout_eval", "serial", "serial_dropout", "residual", "repeat", "conv1d",
    "conv2d", "max_pool", "avg_pool", "global_avg_pool", "batch_norm_eval", "layer_norm", "group_norm",
    "random_shift", "embedding",
}
MUST_REFUSE = {"batch_norm", "cnn1d_bn_residual"}        # batch norm in training mode mixes examples


def _loss_and_target(pred, seed):
    # NumPy targets: an eager jax.random call compiles once per shape (slow on a loaded CI machine)
    y = np.random.default_rng(seed).standard_normal(pred.shape).astype(pred.dtype)
    return jp.mse(), jnp.asarray(y)


def reference(net, loss, params, x, y, ctx):
    """g_n = d l_n / d params by jax.grad, l_n = N x (example n's share of J), from the same
    full-batch forward (so dropout's mask is the same): rows other than n held constant."""
    n = x.shape[0]

    def l_n(p, i):
        pred, _ = call_forward(net, p, x, **ctx)
        keep = (jnp.arange(n) == i).reshape((n,) + (1,) * (pred.ndim - 1))
        pred = jnp.where(keep, pred, jax.lax.stop_gradient(pred))
        return n * loss.forward(pred, y)[0]

    return jax.vmap(jax.grad(l_n), in_axes=(None, 0))(params, jnp.arange(n))


def _sq(tree, n):
    return sum((g.reshape(n, -1) ** 2).sum(axis=1) for g in jax.tree_util.tree_leaves(tree)) + jnp.zeros(n)


def _close(a, b, rtol, what):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(initial=0.0), 1e-30)
    err = np.abs(a - b).max(initial=0.0) / scale
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"


def _check_case(case, dtype, jit, rtol):
    layer, params, x, ctx = setup(case, dtype)
    pred = jax.eval_shape(lambda p, xx: call_forward(layer, p, xx, **ctx)[0], params, x)
    loss, y = _loss_and_target(pred, 11)
    n = x.shape[0]
    grads_fn = pe.per_example_grads(layer, loss)
    norms_fn = pe.per_example_grad_norms(layer, loss)
    if case.name in MUST_REFUSE:
        for fn in (grads_fn, norms_fn):
            with pytest.raises(PerExampleUnsupported, match="group_norm"):
                jax.eval_shape(lambda p, xx, yy: fn(p, xx, yy, **ctx), params, x, y)
        return

    def ours(p, xx, yy):
        return grads_fn(p, xx, yy, **ctx), norms_fn(p, xx, yy, **ctx)

    def theirs(p, xx, yy):
        with jax.default_matmul_precision("highest"):
            return reference(layer, loss, p, xx, yy, ctx), jp.value_and_grad(layer, loss)(p, xx, yy, **ctx)[1]

    try:
        if jit:                                 # one compile for everything
            (got, norms), (ref, batch_grad) = jax.jit(lambda *a: (ours(*a), theirs(*a)))(params, x, y)
        else:
            got, norms = ours(params, x, y)
    except PerExampleUnsupported as e:
        assert case.name not in MUST_SUPPORT, f"{case.name} must have per-example gradients: {e}"
        assert "no per-example gradient rule" in str(e), str(e)
        pytest.skip(f"no per-example rule: {str(e).split(': no per-example')[0]}")
    if not jit:
        ref, batch_grad = jax.jit(theirs)(params, x, y)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
    for (path, g), r, p in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(ref),
                               jax.tree_util.tree_leaves(params)):
        where = f"{case.name} {jax.tree_util.keystr(path)} {jnp.dtype(dtype).name}"
        assert g.shape == (n,) + p.shape and g.dtype == p.dtype, where
        _close(g, r, rtol, where)
    for g, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(batch_grad)):
        _close(g.mean(axis=0), b, rtol, f"{case.name}: mean of the per-example grads vs the batch gradient")
    assert norms.shape == (n,)
    _close(norms, jnp.sqrt(_sq(ref, n)), rtol, f"{case.name} norms")


@pytest.mark.parametrize("case", CASES, ids=str)
def test_registry_float64_jit(case):
    _check_case(case, jnp.float64, True, 1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"dense_3d", "conv2d", "group_norm", "repeat",
                                                                   "residual", "batch_norm"}], ids=str)
def test_registry_float64_eager(case):
    _check_case(case, jnp.float64, False, 1e-9)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in {"dense", "conv1d", "layer_norm", "serial_dropout",
                                                                   "batch_norm_eval"}], ids=str)
def test_registry_float32_jit(case):
    _check_case(case, jnp.float32, True, 1e-4)


# ---------------------------------------------------------------- every branch of the norms rules

NORM_BRANCHES = [
    # dense: T = 1 (||x||^2 ||dy||^2), Gram (2 T^2 <= I O), direct (2 T^2 > I O)
    ("dense_2d", lambda: jp.dense(6), (5, 4), None),
    ("dense_gram", lambda: jp.dense(6), (3, 3, 5), None),
    ("dense_direct", lambda: jp.dense(2), (3, 7, 2), None),
    # conv: the form conv._norms_form picks (fewest multiply-adds among those whose temporaries fit
    # in the per-example kernel's size; the taps unrolled when T C/G <= P, else a scan over them)
    ("conv1d_tap_gram", lambda: jp.conv1d(16, 3), (3, 3, 6), "tap gram"),
    ("conv1d_tap_gram_groups_dilation", lambda: jp.conv1d(32, 2, stride=2, dilation=2, groups=2, padding="VALID"),
     (2, 7, 12), "tap gram"),
    ("conv1d_shifted_gram", lambda: jp.conv1d(16, 5), (3, 8, 8), "shifted gram"),
    ("conv1d_taps_unrolled_circular", lambda: jp.conv1d(3, 3, padding="CIRCULAR"), (2, 11, 2), "taps unrolled"),
    ("conv1d_taps_scan", lambda: jp.conv1d(4, 3), (2, 10, 8), "taps"),
    ("conv2d_tap_gram", lambda: jp.conv2d(16, (2, 2), stride=2), (2, 2, 4, 4), "tap gram"),
    ("conv2d_taps_unrolled", lambda: jp.conv2d(2, 3, bias=False), (2, 6, 5, 1), "taps unrolled"),
]


@pytest.mark.parametrize("name,make,shape,form", NORM_BRANCHES, ids=[b[0] for b in NORM_BRANCHES])
def test_norm_branches(name, make, shape, form, monkeypatch):
    from jaxprop.layers import conv
    picked = []
    choose = conv._norms_form
    monkeypatch.setattr(conv, "_norms_form", lambda *a: picked.append(choose(*a)) or picked[-1])
    _check_case(jp.testing.Case(name, make, shape), jnp.float64, True, 1e-9)
    assert picked == ([form] if form else []), f"{name}: the rule took {picked}, the case is meant for {form}"


FORCED = [  # every form on the awkward geometries, whatever the rule would pick there
    ("stride_dilation_valid", lambda: jp.conv1d(6, 3, stride=2, dilation=2, padding="VALID"), (3, 13, 4)),
    ("stride_groups_uneven_pads", lambda: jp.conv1d(6, 4, stride=3, groups=2, padding=(1, 2)), (2, 10, 4)),
    ("conv2d_stride_groups", lambda: jp.conv2d(4, (3, 2), stride=(2, 1), groups=2), (2, 7, 5, 4)),
    ("conv2d_circular_dilation", lambda: jp.conv2d(4, 3, padding="CIRCULAR", dilation=(1, 2)), (2, 6, 7, 2)),
]


@pytest.mark.parametrize("form", ["taps", "taps unrolled", "tap gram", "shifted gram"])
@pytest.mark.parametrize("name,make,shape", FORCED, ids=[f[0] for f in FORCED])
def test_conv_norm_forms_forced(name, make, shape, form, monkeypatch):
    from jaxprop.layers import conv
    monkeypatch.setattr(conv, "_norms_form", lambda *a: form)
    _check_case(jp.testing.Case(name, make, shape), jnp.float64, True, 1e-9)


def test_conv_norm_forms_on_the_mnist1d_cnn():
    """The choice measured in experiments/bench/per_example.py: on the MNIST-1D CNN's shapes (P = 40,
    K = 5, 'same' padding, 32 channels) the deep layers take the shifted Gram, the first (C = 1) the unrolled taps."""
    from jaxprop.layers import conv
    assert conv._norms_form(5, 40, 44, 1, 32, 32) == "shifted gram"
    assert conv._norms_form(5, 40, 44, 1, 1, 32) == "taps unrolled"
    # a 2-D layer on 28 x 28 positions: the (784 x 784) Grams are larger than the kernel, and the
    # (9, 32, 64) kernels smaller than dY (784, 64), so the taps, unrolled
    assert conv._norms_form(9, 784, 900, 1, 32, 64) == "taps unrolled"
    assert conv._norms_form(9, 49, 81, 1, 64, 64) == "shifted gram"     # its 7 x 7 deep layer


def test_per_example_forward_literal():
    """jax.vmap(jax.grad(l_n)) with each example's forward run on its own (x_n[None]):
    an MLP and a CNN with group norm, softmax cross-entropy, float64."""
    for net, shape in ((jp.serial(jp.dense(8), jp.relu(), jp.dense(8), jp.tanh(), jp.dense(3)), (6, 5)),
                       (jp.serial(jp.conv1d(4, 3), jp.group_norm(2), jp.relu(), jp.conv1d(4, 3), jp.group_norm(2),
                                  jp.relu(), jp.global_avg_pool(), jp.dense(3)), (5, 9, 2))):
        loss = jp.softmax_cross_entropy()
        _, params = net.init(jax.random.key(0), shape)
        x = jax.random.normal(jax.random.key(1), shape)
        y = jax.random.randint(jax.random.key(2), (shape[0],), 0, 3)

        def l_n(p, xn, yn):
            return loss.forward(call_forward(net, p, xn[None])[0], yn[None])[0]

        @jax.jit
        def both(p, xx, yy):
            return (jax.vmap(jax.grad(l_n), in_axes=(None, 0, 0))(p, xx, yy), pe.per_example_grads(net, loss)(p, xx, yy),
                    pe.per_example_grad_norms(net, loss)(p, xx, yy))

        ref, got, norms = both(params, x, y)
        for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
            _close(g, r, 1e-9, net.name)
        _close(norms, jnp.sqrt(_sq(ref, shape[0])), 1e-9, net.name + " norms")


def test_where_mask_and_sequences():
    """(N, T, C) logits with a where= mask: J = sum over counted / count; per-example shares."""
    net = jp.serial(jp.dense(6), jp.tanh(), jp.dense(4))
    loss = jp.softmax_cross_entropy()
    _, params = net.init(jax.random.key(0), (3, 5, 2))
    x = jax.random.normal(jax.random.key(1), (3, 5, 2))
    y = jax.random.randint(jax.random.key(2), (3, 5), 0, 4)
    where = jax.random.bernoulli(jax.random.key(3), 0.6, (3, 5))
    n = 3

    def l_n(p, i):
        pred, _ = call_forward(net, p, x)
        keep = (jnp.arange(n) == i)[:, None, None]
        return n * loss.forward(jnp.where(keep, pred, jax.lax.stop_gradient(pred)), y, where=where)[0]

    @jax.jit
    def both(p):
        return (jax.vmap(jax.grad(l_n), in_axes=(None, 0))(p, jnp.arange(n)),
                pe.per_example_grads(net, loss)(p, x, y, where=where),
                pe.per_example_grad_norms(net, loss)(p, x, y, where=where))

    ref, got, norms = both(params)
    for g, r in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ref)):
        _close(g, r, 1e-9, "where")
    _close(norms, jnp.sqrt(_sq(ref, n)), 1e-9, "where norms")


# ---------------------------------------------------------------- refusals

def test_layer_without_rule_is_named():
    plain = jp.Layer(jp.dense(3).init, jp.dense(3).forward, jp.dense(3).backward, name="my_dense")
    net = jp.serial(jp.dense(4), jp.relu(), plain)
    _, params = net.init(jax.random.key(0), (4, 3))
    x, y = jnp.ones((4, 3)), jnp.zeros((4, 3))
    for fn in (pe.per_example_grads, pe.per_example_grad_norms):
        with pytest.raises(PerExampleUnsupported, match="my_dense: no per-example gradient rule"):
            jax.eval_shape(fn(net, jp.mse()), params, x, y)
    with pytest.raises(PerExampleUnsupported, match="my_dense"):
        jax.eval_shape(pe.dp_value_and_grad(net, jp.mse(), 1.0, 1.0), params, x, y, jax.random.key(0))


def test_batch_norm_training_refuses_eval_does_not():
    net = jp.serial(jp.dense(4), jp.batch_norm(), jp.relu(), jp.dense(2))
    _, params = net.init(jax.random.key(0), (5, 3))
    state = jp.init_state(net, (5, 3))
    x, y = jax.random.normal(jax.random.key(1), (5, 3)), jnp.zeros((5, 2))
    with pytest.raises(PerExampleUnsupported, match=r"batch_norm\(0.9\): batch norm in training mode mixes.*group_norm"):
        jax.eval_shape(lambda p: pe.per_example_grads(net, jp.mse())(p, x, y, state=state), params)
    with pytest.raises(PerExampleUnsupported, match="group_norm"):
        jax.eval_shape(lambda p: pe.dp_value_and_grad(net, jp.mse(), 1.0, 1.0)(p, x, y, 0, state=state), params)

    @jax.jit
    def evaluation(p):
        return (pe.per_example_grads(net, jp.mse())(p, x, y, state=state, train=False),
                pe.dp_value_and_grad(net, jp.mse(), 1.0, 1.0)(p, x, y, 0, state=state, train=False))

    g, ((value, new_state), _) = evaluation(params)
    assert g[1]["scale"].shape == (5, 4)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a, b: bool((a == b).all()), new_state, state))


def test_bad_arguments():
    with pytest.raises(ValueError, match="l2_clip must be a positive"):
        pe.dp_value_and_grad(jp.dense(2), jp.mse(), 0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier"):
        pe.dp_value_and_grad(jp.dense(2), jp.mse(), 1.0, -1.0)
    with pytest.raises(TypeError, match="did you forget the call"):
        pe.per_example_grads(jp.dense(2), jp.mse)


# ---------------------------------------------------------------- DP-SGD against optax

def _mlp_batch(n=7):
    net = jp.serial(jp.dense(6), jp.gelu(), jp.dense(5), jp.tanh(), jp.dense(3))
    loss = jp.softmax_cross_entropy()
    _, params = net.init(jax.random.key(0), (n, 4))
    x = 3.0 * jax.random.normal(jax.random.key(1), (n, 4))
    y = jax.random.randint(jax.random.key(2), (n,), 0, 3)
    return net, loss, params, x, y


def _vmap_grads(net, loss):
    def l_n(p, xn, yn):
        return loss.forward(call_forward(net, p, xn[None])[0], yn[None])[0]
    return jax.jit(jax.vmap(jax.grad(l_n), in_axes=(None, 0, 0)))


@pytest.mark.parametrize("clip", [0.3, 1e6])
def test_dp_value_and_grad_equals_optax(clip):
    net, loss, params, x, y = _mlp_batch()
    sigma, key = 1.3, jax.random.key(42)
    norms = jax.jit(pe.per_example_grad_norms(net, loss))(params, x, y)
    if clip < 1:
        assert int((norms > clip).sum()) >= 3, "the test must clip some examples"
    tx = optax.contrib.differentially_private_aggregate(clip, sigma, key)
    vmap_grads = _vmap_grads(net, loss)

    @jax.jit
    def step(params, state, key_t):
        want, state = tx.update(vmap_grads(params, x, y), state)
        value, got = pe.dp_value_and_grad(net, loss, clip, sigma)(params, x, y, key_t)
        return want, state, value, got, jp.value_and_grad(net, loss)(params, x, y)[0], pe.next_key(key_t, params)

    state, key_t = tx.init(params), key
    for i in range(2):                                       # two steps: next_key follows optax's state
        want, state, value, got, plain_value, key_t = step(params, state, key_t)
        for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
            _close(g, w, 1e-12, f"dp step {i}")
        assert jnp.allclose(value, plain_value)
        params = jax.tree_util.tree_map(lambda p, g: p - 0.1 * g, params, got)


def test_clipped_mean_and_dp_noise_chain():
    """clipped_value_and_grad + dp_noise in the optimizer = optax's aggregate followed by sgd."""
    net, loss, params, x, y = _mlp_batch()
    clip, sigma, key, n = 0.5, 0.7, jax.random.key(3), x.shape[0]
    ours = optax.chain(pe.dp_noise(clip, sigma, n, key), optax.sgd(0.1))
    theirs = optax.chain(optax.contrib.differentially_private_aggregate(clip, sigma, key), optax.sgd(0.1))
    grad_fn, vmap_grads = pe.ClippedGrad(clip)(net, loss), _vmap_grads(net, loss)

    @jax.jit
    def step(p1, s1, p2, s2):
        u1, s1 = ours.update(grad_fn(p1, x, y)[1], s1, p1)
        u2, s2 = theirs.update(vmap_grads(p2, x, y), s2, p2)
        return optax.apply_updates(p1, u1), s1, optax.apply_updates(p2, u2), s2

    p1, s1, p2, s2 = params, ours.init(params), params, theirs.init(params)
    for _ in range(3):
        p1, s1, p2, s2 = step(p1, s1, p2, s2)
    for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
        _close(a, b, 1e-12, "three DP-SGD steps")
    # without clipping the clipped mean is the ordinary gradient
    g, want = jax.jit(lambda p: (pe.clipped_value_and_grad(net, loss, 1e9)(p, x, y)[1], jp.grad(net, loss)(p, x, y)))(params)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(want)):
        _close(a, b, 1e-12, "unclipped")
    assert hash(pe.ClippedGrad(0.5)) == hash(pe.ClippedGrad(0.5))


def test_clip_factors_match_optax():
    g = [jnp.array([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0], [4.0, 0.0, 3.0], [0.3, 0.4, 0.0]])]
    for c in (0.0, 1.25, jnp.inf):
        want, _ = optax.per_example_global_norm_clip(g, c)
        norms = jnp.sqrt((g[0] ** 2).sum(axis=1))
        np.testing.assert_allclose(pe.clip_factors(norms, c) @ g[0], want[0], rtol=1e-15)


def test_repeat_per_example_layout():
    net = jp.repeat(jp.serial(jp.dense(4), jp.tanh()), 3)
    _, params = net.init(jax.random.key(0), (5, 4))
    x, y = jax.random.normal(jax.random.key(1), (5, 4)), jax.random.normal(jax.random.key(2), (5, 4))
    g = pe.per_example_grads(net, jp.mse())(params, x, y)
    assert g[0]["w"].shape == (5, 3, 4, 4)             # (N, n, I, O): example first, then block


# ---------------------------------------------------------------- the accountant

def test_epsilon_matches_dp_accounting():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting import rdp
    acc = rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(0.02, dp_accounting.GaussianDpEvent(1.1)), 500)
    assert pe.epsilon(1.1, 0.02, 500, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert pe.epsilon(1.1, 0.02, 0, 1e-5) == 0.0
    assert pe.epsilon(0.0, 0.02, 10, 1e-5) == float("inf")
    assert pe.epsilon(2.0, 0.02, 500, 1e-5) < pe.epsilon(1.1, 0.02, 500, 1e-5)
    with pytest.raises(ValueError, match="delta"):
        pe.epsilon(1.0, 0.1, 10, 0.0)


# ---------------------------------------------------------------- DP-SGD in training and in the runner

def test_dp_fit_resumes_bit_for_bit(tmp_path):
    """The noise key lives in the optimizer state: a DP run killed after a checkpoint and
    resumed ends with the uninterrupted run's parameters."""
    from jaxprop import data, models, train
    moons = data.load("moons")
    net = models.build_model("mlp:8:tanh", 2)
    tx = optax.chain(pe.dp_noise(0.5, 1.0, 20, jax.random.key(5)), optax.adam(1e-2))
    kw = dict(grad=pe.ClippedGrad(0.5), steps=24, batch_size=20, eval_every=8, checkpoint_every=7,
              progress=False, seed=3)
    ref = train.fit(net, None, tx, moons, **kw)
    plain = train.fit(net, None, optax.adam(1e-2), moons, **dict(kw, grad="hand"))
    assert ref.params_fingerprint != plain.params_fingerprint

    class Boom(Exception):
        pass

    def failing(row, params):
        if row["step"] == 16:
            raise Boom()

    paths = dict(checkpoint_dir=str(tmp_path / "ck"), metrics_path=str(tmp_path / "m.jsonl"))
    with pytest.raises(Boom):
        train.fit(net, None, tx, moons, **paths, **kw, callback=failing)
    again = train.fit(net, None, tx, moons, resume=True, **paths, **kw)
    assert again.resumed_from == 14 and again.params_fingerprint == ref.params_fingerprint


def test_runner_dp_options(tmp_path, capsys):
    from jaxprop.runner import cli
    out = tmp_path / "run"
    rc = cli.main(["--dataset", "moons", "--steps", "20", "--batch-size", "50", "--dp-clip", "0.8",
                   "--dp-noise", "1.2", "--dp-delta", "1e-4", "--no-progress", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    import json
    s = json.loads((out / "summary.json").read_text())
    cfg = json.loads((out / "config.json").read_text())["resolved"]
    assert (s["dp_clip"], s["dp_noise"], s["dp_delta"], s["dp_steps"]) == (0.8, 1.2, 1e-4, 20)
    assert cfg["dp_clip"] == 0.8 and cfg["dp_noise"] == 1.2
    if pytest.importorskip("dp_accounting"):
        q = 50 / json.loads((out / "config.json").read_text())["dataset"]["n_train"]
        assert s["dp_sampling_rate"] == pytest.approx(q)
        assert s["dp_epsilon"] == pytest.approx(pe.epsilon(1.2, q, 20, 1e-4))
    for bad, msg in ((["--dp-noise", "1.0"], "need --dp-clip"), (["--dp-clip", "-1"], "--dp-clip must be"),
                     (["--dp-clip", "1", "--grad", "autodiff"], "--grad hand")):
        rc = cli.main(["--dataset", "moons", "--steps", "2", "--no-progress", "--out", str(tmp_path / "x")] + bad)
        assert rc == 2 and msg in capsys.readouterr().err


# ---------------------------------------------------------------- chunked sweeps (less memory, same numbers)

def _gn_cnn_batch(n=7):
    net = jp.serial(jp.reshape((-1, 2)), jp.conv1d(4, 3), jp.group_norm(2), jp.relu(), jp.global_avg_pool(),
                    jp.dense(3))
    _, params = net.init(jax.random.key(0), (n, 12))
    x = jax.random.normal(jax.random.key(1), (n, 12))
    y = jax.random.randint(jax.random.key(2), (n,), 0, 3)
    return net, jp.softmax_cross_entropy(), params, x, y


@pytest.mark.parametrize("chunk_size", [3, 7, 10])          # a remainder; one chunk; larger than the batch
def test_chunked_sweeps_equal_the_whole_batch(chunk_size):
    net, loss, params, x, y = _gn_cnn_batch()
    want = jax.jit(pe.per_example_grad_norms(net, loss))(params, x, y)
    got = jax.jit(pe.per_example_grad_norms(net, loss, chunk_size=chunk_size))(params, x, y)
    assert got.shape == (7,)
    _close(got, want, 1e-12, f"chunked norms ({chunk_size})")
    _close(got, jnp.sqrt(_sq(_vmap_grads(net, loss)(params, x, y), 7)), 1e-12, "chunked norms vs vmap")
    clip = float(jnp.median(want))                            # clips about half of the examples
    for make, args in ((lambda **k: pe.dp_value_and_grad(net, loss, clip, 0.7, **k), (params, x, y, jax.random.key(5))),
                       (lambda **k: pe.clipped_value_and_grad(net, loss, clip, **k), (params, x, y))):
        (v1, g1), (v2, g2) = (jax.jit(make(**k))(*args) for k in ({}, {"chunk_size": chunk_size}))
        _close(v2, v1, 1e-12, "chunked loss value")
        for a, b in zip(jax.tree_util.tree_leaves(g2), jax.tree_util.tree_leaves(g1)):
            _close(a, b, 1e-12, f"chunked clipped gradient ({chunk_size})")


def test_chunked_sweeps_refuse_what_they_cannot_split():
    net, loss, params, x, y = _gn_cnn_batch()
    f = pe.per_example_grad_norms(net, loss, chunk_size=3)
    with pytest.raises(ValueError, match="chunk_size with where="):
        f(params, x, y, where=jnp.ones(7, bool))
    with pytest.raises(ValueError, match="chunk_size with a key"):
        f(params, x, y, key=jax.random.key(0))
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="chunk_size must be a positive int"):
            pe.dp_value_and_grad(net, loss, 1.0, 1.0, chunk_size=bad)
    bn = jp.serial(jp.dense(3), jp.batch_norm(), jp.dense(2))
    _, p = bn.init(jax.random.key(0), (6, 4))
    state = jp.init_state(bn, (6, 4))
    xb, yb = jax.random.normal(jax.random.key(1), (6, 4)), jax.random.normal(jax.random.key(2), (6, 2))
    with pytest.raises(PerExampleUnsupported, match="mixes"):
        pe.clipped_value_and_grad(bn, jp.mse(), 1.0, chunk_size=2)(p, xb, yb, state=state)
    (v, s), g = pe.clipped_value_and_grad(bn, jp.mse(), 1.0, chunk_size=4)(p, xb, yb, state=state, train=False)
    (v0, s0), g0 = pe.clipped_value_and_grad(bn, jp.mse(), 1.0)(p, xb, yb, state=state, train=False)
    _close(v, v0, 1e-12, "batch norm eval, chunked")
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(s0)))


def test_runner_dp_chunk_size(tmp_path, capsys):
    from jaxprop.runner import cli
    import json
    outs = []
    for extra in ([], ["--dp-chunk-size", "16"]):
        out = tmp_path / f"run{len(extra)}"
        rc = cli.main(["--dataset", "moons", "--steps", "5", "--batch-size", "50", "--dp-clip", "0.8",
                       "--no-progress", "--out", str(out)] + extra)
        assert rc == 0, capsys.readouterr().err
        outs.append(json.loads((out / "summary.json").read_text()))
        cfg = json.loads((out / "config.json").read_text())["resolved"]
        assert cfg["dp_chunk_size"] == (16 if extra else None)
    assert outs[1]["final_train_loss"] == pytest.approx(outs[0]["final_train_loss"], rel=1e-4)
    for bad, msg in ((["--dp-chunk-size", "4"], "need --dp-clip"),
                     (["--dp-clip", "1", "--dp-chunk-size", "0"], "--dp-chunk-size must be")):
        rc = cli.main(["--dataset", "moons", "--steps", "2", "--no-progress", "--out", str(tmp_path / "x")] + bad)
        assert rc == 2 and msg in capsys.readouterr().err

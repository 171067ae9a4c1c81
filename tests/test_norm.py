"""batch_norm / layer_norm / group_norm: state update, train vs eval, semantics, more gradient checks."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from test_conv import max_rel_err, random_inputs, vjp_errors

STATE = {"mean": jnp.array([0.3, -1.0, 2.0]), "var": jnp.array([0.5, 2.0, 1.5])}

CONFIGS = [
    (lambda: jp.batch_norm(), (2, 3, 4, 3), {"train": True}, jnp.float64),
    (lambda: jp.batch_norm(), (2, 1), {"train": True}, jnp.float64),          # batch of two, one channel
    (lambda: jp.batch_norm(), (5, 4, 3), {"train": True}, jnp.float32),
    (lambda: jp.batch_norm(), (2, 3, 4, 3), {"train": False, "state": STATE}, jnp.float64),
    (jp.layer_norm, (2, 3, 4, 5), {}, jnp.float64),
    (lambda: jp.group_norm(1), (3, 4, 6), {}, jnp.float64),
    (lambda: jp.group_norm(6), (3, 4, 6), {}, jnp.float64),                    # instance norm
    (lambda: jp.group_norm(2), (3, 6), {}, jnp.float32),
]


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_gradients_match_vjp(i):
    make, shape, ctx, dtype = CONFIGS[i]
    tol = 1e-9 if dtype == jnp.float64 else 1e-4
    assert max(vjp_errors(make(), shape, dtype, **ctx)) <= tol


def test_uniform_cotangent_hides_a_batch_norm_bug():
    """A backward that forgets the variance path (the xhat * mean(dxhat xhat) term) agrees with
    jax.vjp when dy is all ones (normalized values sum to zero), and is caught by a random dy."""
    good = jp.batch_norm()

    def broken_backward(cache, dy):
        grads, _ = good.backward(cache, dy)
        dxhat = dy * cache["scale"][None, :]
        return grads, cache["r"] * (dxhat - dxhat.mean(axis=0, keepdims=True))

    bad = good._replace(backward=broken_backward)
    params, x, dy = random_inputs(good, (6, 3), jnp.float64, train=True)

    def dx_errors(d):
        ref = jax.vjp(lambda xx: good.forward(params, xx)[0], x)[1](d)[0]
        _, cache = bad.forward(params, x)
        return max_rel_err(bad.backward(cache, d)[1], ref) if np.max(np.abs(ref)) > 1e-12 else \
            float(np.max(np.abs(bad.backward(cache, d)[1] - ref)))

    assert dx_errors(jnp.ones_like(dy)) < 1e-12          # a uniform cotangent cannot see the bug
    assert dx_errors(dy) > 1e-2                          # a random one does
    assert max(vjp_errors(good, (6, 3), jnp.float64, train=True)) <= 1e-9


def test_batch_norm_train_normalizes_each_channel():
    layer = jp.batch_norm()
    _, params = layer.init(None, (8, 5, 3))                               # scale 1, offset 0
    _, x, _ = random_inputs(layer, (8, 5, 3), jnp.float64, train=True)
    x = x * jnp.array([1.0, 5.0, 0.1])[None, None, :] + jnp.array([3.0, -2.0, 0.5])[None, None, :]
    y, _ = layer.forward(params, x, state=layer.init_state(x.shape), train=True)
    np.testing.assert_allclose(y.mean(axis=(0, 1)), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=(0, 1)), 1.0 / (1.0 + 1e-5 / np.asarray(x.var(axis=(0, 1)))), rtol=1e-12)


def test_state_update_through_value_and_grad():
    """((J, new_state), grads): running statistics move by the momentum rule, computed here from
    the batch that reached the batch-norm layer; grads equal jax.grad's and hold no state."""
    net = jp.serial(jp.conv1d(3, 3, bias=False), jp.batch_norm(momentum=0.7), jp.relu(),
                    jp.global_avg_pool(), jp.dense(2))
    loss = jp.softmax_cross_entropy()
    params, x, _ = random_inputs(net, (5, 6, 2), jnp.float64, train=True, state=jp.init_state(net, (5, 6, 2)))
    labels = jnp.array([0, 1, 1, 0, 1])
    state = jp.init_state(net, x.shape)
    state = (state[0], {"mean": jnp.array([0.1, 0.2, 0.3]), "var": jnp.array([1.5, 0.5, 2.0])}) + state[2:]
    (value, new_state), grads = jax.jit(jp.value_and_grad(net, loss))(params, x, labels, state=state)

    conv_out = jp.conv1d(3, 3, bias=False).forward(params[0], x)[0]
    mu, var = np.asarray(conv_out).mean(axis=(0, 1)), np.asarray(conv_out).var(axis=(0, 1))
    np.testing.assert_allclose(new_state[1]["mean"], 0.7 * np.asarray(state[1]["mean"]) + 0.3 * mu, rtol=1e-12)
    np.testing.assert_allclose(new_state[1]["var"], 0.7 * np.asarray(state[1]["var"]) + 0.3 * var, rtol=1e-12)
    assert new_state[0] == () and new_state[2:] == ((), (), ())

    def cost(p):
        pred, cache = jp.call_forward(net, p, x, train=True, state=state)
        return loss.forward(pred, labels)[0], net.update_state(state, cache)

    (v_ref, s_ref), g_ref = jax.value_and_grad(cost, has_aux=True)(params)
    np.testing.assert_allclose(value, v_ref, rtol=1e-12)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(g_ref)):
        assert max_rel_err(a, b) <= 1e-9
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert "mean" not in str(jax.tree_util.tree_structure(grads))       # the optimizer never sees state

    # evaluation: running statistics are used and the state does not move
    (_, same), _ = jp.value_and_grad(net, loss)(params, x, labels, state=new_state, train=False)
    for a, b in zip(jax.tree_util.tree_leaves(same), jax.tree_util.tree_leaves(new_state)):
        np.testing.assert_array_equal(a, b)


def test_running_statistics_follow_the_momentum_rule():
    layer = jp.batch_norm(momentum=0.9)
    params, x, _ = random_inputs(layer, (16, 2), jnp.float64, train=True)
    x = x * 2.0 + 3.0
    state = layer.init_state(x.shape)

    @jax.jit
    def step(s):
        _, cache = layer.forward(params, x, state=s, train=True)
        return layer.update_state(s, cache)

    for _ in range(20):
        state = step(state)
    mu, var = np.asarray(x).mean(0), np.asarray(x).var(0)
    np.testing.assert_allclose(state["mean"], (1 - 0.9 ** 20) * mu, rtol=1e-12)          # from 0
    np.testing.assert_allclose(state["var"], 0.9 ** 20 + (1 - 0.9 ** 20) * var, rtol=1e-12)  # from 1


def test_batch_norm_eval_uses_running_statistics():
    layer = jp.batch_norm()
    params, x, dy = random_inputs(layer, (4, 5, 3), jnp.float32, train=False, state=STATE)
    y, cache = layer.forward(params, x, state=STATE, train=False)
    assert y.dtype == jnp.float32                                    # float64 state cast to the input's dtype
    m, v = np.asarray(STATE["mean"]), np.asarray(STATE["var"])
    expected = np.asarray(params["scale"]) * (np.asarray(x) - m) / np.sqrt(v + 1e-5) + np.asarray(params["offset"])
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert layer.update_state(STATE, cache) is STATE                 # an evaluation pass leaves it alone
    _, dx = layer.backward(cache, dy)
    np.testing.assert_allclose(dx, np.asarray(dy) * np.asarray(params["scale"]) / np.sqrt(v + 1e-5), rtol=1e-5)


def test_layer_and_group_norm_match_numpy():
    x = np.random.default_rng(0).standard_normal((3, 4, 6)) * 3 + 1
    layer_params = {"scale": jnp.arange(1.0, 7.0), "offset": jnp.linspace(-1, 1, 6)}
    g, b = np.asarray(layer_params["scale"]), np.asarray(layer_params["offset"])

    def ref(xg, axes):
        return (xg - xg.mean(axes, keepdims=True)) / np.sqrt(xg.var(axes, keepdims=True) + 1e-5)

    y = jp.layer_norm().forward(layer_params, jnp.asarray(x))[0]
    np.testing.assert_allclose(y, g * ref(x, -1) + b, rtol=1e-10)
    y = jp.group_norm(2).forward(layer_params, jnp.asarray(x))[0]
    xg = x.reshape(3, 4, 2, 3)
    np.testing.assert_allclose(y, g * ref(xg, (1, 3)).reshape(x.shape) + b, rtol=1e-10)
    y = jp.group_norm(1).forward(layer_params, jnp.asarray(x))[0]
    np.testing.assert_allclose(y, g * ref(x, (1, 2)) + b, rtol=1e-10)
    y = jp.group_norm(6).forward(layer_params, jnp.asarray(x))[0]              # instance norm
    np.testing.assert_allclose(y, g * ref(x, 1) + b, rtol=1e-10)


def test_bad_inputs():
    layer = jp.batch_norm()
    params = {"scale": jnp.ones(3), "offset": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"batch_norm.*evaluation.*state"):
        layer.forward(params, jnp.zeros((2, 3)), train=False)
    with pytest.raises(ValueError, match=r"batch_norm.*3 features.*\(2, 4\)"):
        layer.forward(params, jnp.zeros((2, 4)), state=STATE)
    with pytest.raises(ValueError, match=r"batch_norm.*float64.*float32"):
        layer.forward(params, jnp.zeros((2, 3), jnp.float32), state=STATE)
    with pytest.raises(ValueError, match="momentum"):
        jp.batch_norm(momentum=1.0)
    with pytest.raises(ValueError, match=r"group_norm\(4\).*divide.*\(2, 5, 6\)"):
        jp.group_norm(4).init(None, (2, 5, 6))
    with pytest.raises(ValueError, match=r"layer_norm.*rank >= 2.*\(3,\)"):
        jp.layer_norm().forward(params, jnp.zeros((3,)))
    with pytest.raises(ValueError, match="groups must be a positive int"):
        jp.group_norm(0)
    with pytest.raises(ValueError, match=r"layer_norm: expected dy of shape \(2, 3\)"):
        _, cache = jp.layer_norm().forward(params, jnp.ones((2, 3)))
        jp.layer_norm().backward(cache, jnp.ones((2, 4)))


# ---- numerics and degenerate batches (issue 16, items 6 and 7) ----------------------------------

NEAR_CONSTANT = [(jp.layer_norm, {}), (lambda: jp.group_norm(2), {}), (lambda: jp.batch_norm(), {"train": True})]


@pytest.mark.parametrize("noise", [0.0, 1e-2], ids=["constant", "noisy"])
@pytest.mark.parametrize("make, ctx", NEAR_CONSTANT, ids=["layer_norm", "group_norm", "batch_norm"])
def test_near_constant_large_input_float32(make, ctx, noise):
    """x = 12345.678 (+ noise at ~10 ulps) in float32: mean(x) is off by an ulp (1e-3), which
    eps = 1e-5 used to turn into |y| = 0.3 and hand grads 1e-2 away from jax.grad. Shifted two-pass
    statistics give y = beta exactly for a constant input, and forward and grads that match the
    float64 truth of the same float32 input, and jax.grad of the same forward. (4, 16) is the
    issue's input; (5, 16) gives batch norm 5 entries per channel (a sum of 4 equal ones is exact.)"""
    layer = make()
    fwd = lambda p, xx: jp.call_forward(layer, p, xx, **ctx)[0]
    for shape in ((4, 16), (5, 16)):
        rng = np.random.default_rng(0)
        x = jnp.asarray(12345.678 + noise * rng.standard_normal(shape), jnp.float32)
        params = {"scale": jnp.asarray(rng.standard_normal(16), jnp.float32),
                  "offset": jnp.asarray(rng.standard_normal(16), jnp.float32)}
        dy = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
        y, cache = jp.call_forward(layer, params, x, **ctx)
        grads, dx = layer.backward(cache, dy)
        if noise == 0.0:
            assert np.max(np.abs(np.asarray(y) - np.asarray(params["offset"])[None, :])) == 0.0, shape
        p64 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
        y64, ref64 = _vjp(fwd, p64, x.astype(jnp.float64), dy.astype(jnp.float64))
        assert np.max(np.abs(np.asarray(y) - np.asarray(y64))) <= 1e-5, shape
        refs = (ref64, _vjp(fwd, params, x, dy)[1])
        for ref in refs:              # the float64 truth, and jax.grad of the same float32 forward
            for a, b in zip(jax.tree_util.tree_leaves((grads, dx)), jax.tree_util.tree_leaves(ref)):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(b)), 1.0), shape


@functools.partial(jax.jit, static_argnums=0)
def _vjp(f, params, x, dy):
    """(f(params, x), its VJP at dy), in one compiled program (the reference, not the code under test)."""
    y, vjp = jax.vjp(f, params, x)
    return y, vjp(dy)


@pytest.mark.parametrize("shape", [(0, 3), (0, 5, 3), (4, 0, 3)])
def test_batch_norm_empty_batch_raises(shape):
    layer = jp.batch_norm()
    params = {"scale": jnp.ones(3), "offset": jnp.zeros(3)}
    state = layer.init_state((1, 3))
    for fwd in (layer.forward, jax.jit(layer.forward, static_argnames="train")):
        with pytest.raises(ValueError, match=r"batch_norm\(0.9\): nothing to normalize over.*0 entries"):
            fwd(params, jnp.zeros(shape), state=state, train=True)
    y, _ = layer.forward(params, jnp.zeros(shape), state=state, train=False)     # evaluation: fine, empty
    assert y.shape == shape


def test_other_norms_with_nothing_to_normalize_raise():
    params = {"scale": jnp.ones(4), "offset": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"group_norm\(2\): nothing to normalize over.*\(2, 0, 4\)"):
        jp.group_norm(2).forward(params, jnp.zeros((2, 0, 4)))
    p0 = {"scale": jnp.ones(0), "offset": jnp.zeros(0)}
    with pytest.raises(ValueError, match=r"layer_norm: nothing to normalize over"):
        jp.layer_norm().forward(p0, jnp.zeros((2, 0)))


def test_batch_norm_one_entry_per_channel_warns_once():
    import warnings
    layer = jp.batch_norm()
    params = {"scale": jnp.ones(3), "offset": jnp.asarray([0.5, -1.0, 2.0])}
    state = layer.init_state((1, 3))
    x = jnp.asarray([[1.0, 2.0, 3.0]])
    with pytest.warns(UserWarning, match=r"batch_norm\(0.9\).*output is constant and gradients are zero"):
        y, cache = layer.forward(params, x, state=state, train=True)
    np.testing.assert_array_equal(y, params["offset"][None, :])
    grads, dx = layer.backward(cache, jnp.asarray([[0.3, -0.7, 1.1]]))
    np.testing.assert_array_equal(dx, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # once per layer: the second call is silent
        layer.forward(params, x, state=state, train=True)
        jp.batch_norm().forward(params, jnp.ones((2, 3)), state=state, train=True)   # m = 2: no warning
        jp.batch_norm().forward(params, jnp.ones((1, 2, 3)), state=state, train=True)  # N = 1, L = 2
        layer.forward(params, x, state=state, train=False)
    with pytest.warns(UserWarning, match=r"batch_norm\(0.9\).*output is constant"):   # under jit too (trace time)
        jax.jit(jp.batch_norm().forward, static_argnames="train")(params, jnp.ones((1, 1, 3)), state=state)


# ---- batch norm's two-reduction backward (issue 12, item 1) -------------------------------------

def _full_reductions(fn, cache, dy):
    """reduce_sum equations over a tensor of dy's size in fn's jaxpr (nested jaxprs included:
    jnp.mean is a jitted function)."""
    def count(jaxpr):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == "reduce_sum" and eqn.invars[0].aval.size == dy.size
            for v in eqn.params.values():                     # pjit's "jaxpr" (a ClosedJaxpr)
                sub = getattr(v, "jaxpr", v)
                if hasattr(sub, "eqns"):
                    n += count(sub)
        return n
    return count(jax.make_jaxpr(fn)(cache, dy).jaxpr)


@pytest.mark.parametrize("make, flag, shape", [
    (lambda: jp.batch_norm(), "_BN_TWO_REDUCTIONS", (6, 5, 3)),
    (lambda: jp.batch_norm(), "_BN_TWO_REDUCTIONS", (4, 3, 5, 2)),
    (lambda: jp.group_norm(2), "_GN_FACTORED", (3, 5, 4)),
    (lambda: jp.group_norm(3), "_GN_FACTORED", (2, 3, 4, 6)),
], ids=["batch_norm_1d", "batch_norm_2d", "group_norm_1d", "group_norm_2d"])
def test_norm_backward_reduces_the_full_tensor_twice(make, flag, shape, monkeypatch):
    """batch norm: dx = gamma r (dy - dbeta/m - xhat dgamma/m); group norm: the four sums from two
    spatial sums. The generic backward (the private flag off when the layer is built) reduces the
    full tensor four times; the two agree with each other and with jax.vjp (float64 and float32)."""
    from jaxprop.layers import norm
    layer = make()
    ctx = {"train": True} if layer.stateful else {}
    params, x, dy = random_inputs(layer, shape, jnp.float64, **ctx)
    _, cache = layer.forward(params, x, **ctx)
    assert _full_reductions(layer.backward, cache, dy) == 2
    monkeypatch.setattr(norm, flag, False)
    generic = make()                                         # the flag is read when the layer is built
    monkeypatch.undo()
    assert _full_reductions(generic.backward, cache, dy) == 4
    for a, b in zip(jax.tree_util.tree_leaves(layer.backward(cache, dy)),
                    jax.tree_util.tree_leaves(generic.backward(cache, dy))):
        assert max_rel_err(a, b) <= 1e-12
    assert max(vjp_errors(layer, shape, jnp.float64, **ctx)) <= 1e-9
    assert max(vjp_errors(layer, shape, jnp.float32, seed=1, **ctx)) <= 1e-4

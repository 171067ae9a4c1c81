"""The complexity study: path enumeration, finite differences, forward mode and
backprop give the same gradient, and their operation counts match the closed
forms of docs/complexity.md."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprop as jp
from jaxprop.studies import complexity as cx
from jaxprop.studies import paths as px

ACT = {"sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "relu": jax.nn.relu}

# (widths, activation, output_activation, bias, batch, seed)
CASES = [
    ((1, 1, 1), "sigmoid", "same", False, 1, 0),        # the simplest network
    ((2, 2, 1), "sigmoid", "same", False, 1, 0),        # the 2-2-1 network
    ((3, 4, 2), "tanh", None, True, 3, 0),
    ((2, 3, 3, 2), "relu", "same", True, 4, 3),         # seed 3: no layer is dead
    ((3, 3, 3, 3, 1), "sigmoid", "same", True, 2, 0),
]
IDS = [f"{'-'.join(map(str, c[0]))}-{c[1]}-b{int(c[3])}-n{c[4]}" for c in CASES]


def setup(widths, act, out, bias, n, seed=0):
    """The model, random float64 params in ``model.net``'s layout, x and y.

    numpy draws them (cheaper than compiling jax.random for every shape);
    biases are non-zero, so a wrong bias gradient cannot hide."""
    model = cx.mlp(widths, act, output_activation=out, bias=bias)
    rng = np.random.default_rng(seed)
    params = []
    for k in range(model.depth):
        d = {"w": jnp.asarray(rng.standard_normal((widths[k], widths[k + 1])) / np.sqrt(widths[k]))}
        if bias:
            d["b"] = jnp.asarray(0.3 * rng.standard_normal(widths[k + 1]))
        params.append(d)
        if model.act(k):
            params.append(())
    x = jnp.asarray(rng.standard_normal((n, widths[0])))
    y = jnp.asarray(rng.standard_normal((n, widths[-1])))
    return model, tuple(params), x, y


def reference_cost(model, params, x, y):
    """The same J written directly in jax.numpy, for jax.grad."""
    h = x
    for k in range(model.depth):
        d = params[model.dense_index(k)]
        p = h @ d["w"]
        if model.bias:
            p = p + d["b"][None, :]
        h = ACT[model.act(k)](p) if model.act(k) else p
    return jnp.sum((h - y) ** 2) / x.shape[0]


def assert_trees_close(a, b, atol):
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(la, lb):
        assert u.shape == v.shape
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=atol)


# ----------------------------------------------------------------------------- gradients agree

@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_path_gradient_equals_backprop_and_jax_grad(case):
    model, params, x, y = setup(*case)
    ref = jax.jit(jax.grad(lambda p: reference_cost(model, p, x, y)))(params)
    _, hand = jax.jit(jp.value_and_grad(model.net, jp.mse()))(params, x, y)
    path = px.path_gradient(model, params, x, y)
    scale = max(1.0, max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(ref)))
    assert_trees_close(hand, ref, 1e-12 * scale)
    assert_trees_close(path.grads, ref, 1e-12 * scale)
    assert_trees_close(path.grads, hand, 1e-12 * scale)
    # no leaf is trivially small: a bug cannot hide under the tolerance
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in jax.tree_util.tree_leaves(ref))


@pytest.mark.parametrize("case", CASES[2:4], ids=IDS[2:4])
def test_forward_mode_and_finite_differences(case):
    model, params, x, y = setup(*case)
    ref = jax.jit(jax.grad(lambda p: reference_cost(model, p, x, y)))(params)
    fm = cx.forward_mode_gradient(model, params, x, y, chunk=7)    # 7: exercises padding
    fd = cx.finite_difference_gradient(model, params, x, y, chunk=7)
    assert_trees_close(fm.grads, ref, 1e-12)
    assert_trees_close(fd.grads, ref, 1e-8)     # O(h^2) + O(eps/h) with h = 1e-5
    assert fm.evaluations == model.n_params and fd.evaluations == 2 * model.n_params


def test_influence_paths_sum_to_each_partial_derivative():
    model, params, x, y = setup((3, 3, 2, 1), "sigmoid", "same", True, 2)
    ref = jax.jit(jax.grad(lambda p: reference_cost(model, p, x, y)))(params)
    per = px.paths_per_parameter(model)
    nf = px.factors_per_path(model)
    for layer, i, j, bias in [(0, 2, 1, False), (0, 0, 0, True), (1, 1, 0, False), (2, 0, 0, True)]:
        total = 0.0
        for n in range(2):
            ps = px.influence_paths(model, params, x, y, layer, i, j, example=n, bias=bias)
            assert len(ps) == per[layer]
            for p in ps:
                assert len(p.factors) == nf[layer] and p.neurons[0] == j
                assert p.product == pytest.approx(math.prod(v for _, v in p.factors), rel=1e-15)
            total += sum(p.product for p in ps)
        d = ref[model.dense_index(layer)]
        want = d["b"][j] if bias else d["w"][i, j]
        assert abs(total - float(want)) <= 1e-13


def test_simplest_network_factors_are_named_as_the_chain_rule():
    model, params, x, y = setup((1, 1, 1), "sigmoid", "same", False, 1)
    (p0,) = px.influence_paths(model, params, x, y, 0, 0, 0)
    (p1,) = px.influence_paths(model, params, x, y, 1, 0, 0)
    names = lambda p: [label.split(" = ")[0] for label, _ in p.factors]
    assert names(p0) == ["dP0/dW0", "dX1/dP0", "dP1/dX1", "dY/dP1", "dJ/dY"]
    assert names(p1) == ["dP1/dW1", "dY/dP1", "dJ/dY"]
    # dJ/dP1 = dY/dP1 * dJ/dY is the shared suffix of both products
    assert p0.factors[-2:] == p1.factors[-2:]
    w1 = float(params[2]["w"][0, 0])
    assert p0.factors[2][1] == w1


# ----------------------------------------------------------------------------- counting paths

def brute_force_paths(widths, layer, j):
    """Paths from neuron j of layer ``layer``'s output to the outputs, by DFS."""
    def walk(level, node):
        if level == len(widths) - 1:
            return 1
        return sum(walk(level + 1, m) for m in range(widths[level + 1]))
    return walk(layer + 1, j)


@pytest.mark.parametrize("widths", [(2, 2, 1), (3, 4, 5), (2, 3, 4, 2), (4, 4, 4, 4, 1)])
def test_path_counts_are_products_of_widths(widths):
    model = cx.mlp(widths, bias=False)
    per = px.paths_per_parameter(model)
    for k in range(model.depth):
        assert per[k] == brute_force_paths(widths, k, 0)
    # the first layer's weights reach the cost along every input-to-output path
    assert widths[0] * widths[1] * per[0] == px.input_output_paths(widths) == math.prod(widths)
    assert px.total_paths(model) == sum(widths[k] * widths[k + 1] * per[k] for k in range(model.depth))


def test_path_gradient_enumerates_every_path_once():
    model, params, x, y = setup((2, 3, 3, 2), "tanh", "same", True, 3)
    res = px.path_gradient(model, params, x, y)
    assert res.evaluations == 3 * px.total_paths(model)
    # (2+1)*3*6 + (3+1)*3*2 + (3+1)*2*1 = 54 + 24 + 8 paths per example
    assert px.total_paths(model) == 86


def test_upstream_reuse_by_enumeration():
    for widths, bias in [((2, 2, 1), False), ((3, 2, 2, 1), True)]:
        model, params, x, y = setup(widths, "sigmoid", "same", bias, 1)
        seen = {}
        for k in range(model.depth):
            rows = [(i, False) for i in range(widths[k])] + ([(0, True)] if bias else [])
            for i, b in rows:
                for j in range(widths[k + 1]):
                    for p in px.influence_paths(model, params, x, y, k, i, j, bias=b):
                        for m in range(k, model.depth):   # the path's prefix up to P_m[s]
                            s = p.neurons[m - k]
                            seen.setdefault((m, s), set()).add((k, i, j, b, p.neurons[:m - k + 1]))
        reuse = px.upstream_reuse(model)
        for (m, s), pairs in seen.items():
            assert len(pairs) == reuse[m], (widths, m, s)
    assert px.upstream_reuse(cx.mlp((2, 2, 1), bias=False)) == (2, 6)


# ----------------------------------------------------------------------------- operation counts

def test_count_ops_units():
    a = jnp.ones((3, 4)); b = jnp.ones((4, 5))
    assert cx.count_ops(lambda u, v: u @ v, a, b) == cx.OpCount(mul=60, add=45)
    assert cx.count_ops(lambda u: jnp.sum(u * u), a) == cx.OpCount(mul=12, add=11)
    assert cx.count_ops(lambda u: jax.nn.sigmoid(u) - 1.0, a) == cx.OpCount(add=12, other=12)
    # dead code is not counted: the product's result is unused
    assert cx.count_ops(lambda u, v: (u @ v, u + 1.0)[1], a, b) == cx.OpCount(add=12)
    with pytest.raises(ValueError, match="no cost rule for the primitive 'sin'"):
        cx.count_ops(jnp.sin, a)
    with pytest.raises(ValueError, match="control-flow"):
        cx.count_ops(lambda u: jax.lax.fori_loop(0, 3, lambda i, c: c * 2.0, u), a)


def test_forward_ops_without_the_loss_tail():
    model = cx.mlp((3, 4, 2), "tanh", bias=True)
    tail = cx.OpCount(mul=5 * 2 + 1, add=2 * 5 * 2 - 1)           # MSE over (5, 2): r, r*r, sum, /N
    assert cx.forward_ops(model, 5, loss=False) + tail == cx.forward_ops(model, 5)
    model, params, x, y = setup((3, 4, 2), "tanh", "same", True, 5)
    assert cx.count_ops(lambda p: model.net.forward(p, x)[0], params) == cx.forward_ops(model, 5, loss=False)


def test_simplest_network_counts_by_hand():
    """1-1-1, sigmoid, no bias, one example, each op listed in docs/complexity.md."""
    model = cx.mlp((1, 1, 1), bias=False)
    assert cx.forward_ops(model) == cx.OpCount(mul=4, add=1, other=2)
    assert cx.backprop_ops(model) == cx.OpCount(mul=12, add=3, other=2)
    assert px.path_ops(model) == cx.OpCount(mul=11, add=3, other=2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_counted_ops_match_closed_forms(case):
    model, params, x, y = setup(*case)
    n = case[4]
    assert cx.backprop_gradient(model, params, x, y).ops == cx.backprop_ops(model, n)
    assert px.path_gradient(model, params, x, y).ops == px.path_ops(model, n)
    assert cx.count_ops(lambda p: cx.cost(model, p, x, y), params) == cx.forward_ops(model, n)
    if model.depth <= 2:      # these two run P gradients' worth of work
        assert cx.finite_difference_gradient(model, params, x, y).ops == cx.finite_difference_ops(model, n)
        assert cx.forward_mode_gradient(model, params, x, y).ops == cx.forward_mode_ops(model, n)
    else:
        assert cx._count_cached("jvp", model, n, "float64") == cx.jvp_ops(model, n)


def traced_backprop_ops(model, n=1):
    """Backprop's count read from the engine's jaxpr (not the closed form)."""
    return cx._count_cached("backprop", model, n, "float64")


@pytest.mark.parametrize("w", [2, 3, 5])
def test_backprop_is_linear_and_paths_exponential_in_depth(w):
    models = [cx.mlp((w,) * depth + (1,), bias=True) for depth in range(1, 9)]
    bp = [traced_backprop_ops(m).total for m in models]
    steps = np.diff(bp[1:])             # each extra layer adds the same work
    assert len(set(steps.tolist())) == 1 and steps[0] > 0
    for m, ops in zip(models, bp):       # about 6 ops per weight, never more than 8
        assert 4 * m.n_weights <= ops <= 8 * m.n_params
    naive = [px.path_ops(m).total for m in models]
    ratios = np.array(naive[1:]) / np.array(naive[:-1])
    assert np.all(ratios > w)            # at least w times more work per extra layer


def test_backprop_is_linear_in_weights_across_widths():
    # one example, sigmoid, biases: 5 W - 2 n_0 n_1 + 3 (neurons) + 3 n_L + 2 (docs/complexity.md)
    for widths in [(40, 100, 100, 10), (8, 8, 8, 1), (64, 32, 32, 10)]:
        model = cx.mlp(widths, bias=True)
        ops = traced_backprop_ops(model)
        neurons = sum(widths[1:])
        assert ops.total == 5 * model.n_weights - 2 * widths[0] * widths[1] + 3 * neurons + 3 * widths[-1] + 2


# ----------------------------------------------------------------------------- refusals and bad input

def test_path_limit_error_states_the_path_count():
    model, params, x, y = setup((4, 4, 4, 4, 1), "sigmoid", "same", True, 2)
    total = px.total_paths(model)
    with pytest.raises(px.PathLimitError) as info:
        px.path_gradient(model, params, x, y, max_paths=100)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert f"{total:,} parameter-to-cost paths" in msg and "max_paths=100" in msg
    assert f"{2 * total:,} path products" in msg
    # the caller can raise the limit; exactly the path count is allowed
    res = px.path_gradient(model, params, x, y, max_paths=2 * total)
    assert res.evaluations == 2 * total
    # the default limit refuses a deep wide net before doing any work
    big, pb, xb, yb = setup((8,) * 12 + (1,), "sigmoid", "same", True, 1)
    with pytest.raises(ValueError, match=f"{px.total_paths(big):,} parameter-to-cost paths"):
        px.path_gradient(big, pb, xb, yb)


@pytest.mark.parametrize("kwargs, match", [
    (dict(widths=(3,)), "at least two positive ints"),
    (dict(widths=(3, 0)), "at least two positive ints"),
    (dict(widths=(2.5, 1)), "at least two positive ints"),
    (dict(widths=5), "sequence of positive ints"),
    (dict(widths=(2, 1), activation="softmax"), "activation must be one of"),
    (dict(widths=(2, 1), activation=None), "activation must be one of"),
    (dict(widths=(2, 1), output_activation="bogus"), "output_activation must be one of"),
])
def test_mlp_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cx.mlp(**kwargs)


def test_methods_reject_bad_input():
    model, params, x, y = setup((2, 3, 1), "sigmoid", "same", True, 2)
    with pytest.raises(ValueError, match=r"expected x of shape \(N, 2\)"):
        px.path_gradient(model, params, jnp.ones((2, 3)), y)
    with pytest.raises(ValueError, match=r"expected y of shape \(2, 1\)"):
        cx.backprop_gradient(model, params, x, jnp.ones((3, 1)))
    with pytest.raises(ValueError, match="layer must be in"):
        px.influence_paths(model, params, x, y, 2, 0, 0)
    with pytest.raises(ValueError, match="step must be > 0"):
        cx.finite_difference_gradient(model, params, x, y, step=0.0)
    with pytest.raises(ValueError, match="must be a jaxprop.studies.complexity.MLP"):
        px.path_gradient(model.net, params, x, y)
    with pytest.raises(ValueError, match="has no biases"):
        nb, pnb, _, _ = setup((2, 3, 1), "sigmoid", "same", False, 2)
        px.influence_paths(nb, pnb, x, y, 0, 0, 0, bias=True)


# ----------------------------------------------------------------------------- layout

def test_studies_stay_out_of_the_top_level_namespace():
    """``import jaxprop`` does not load the study; the old import paths still work."""
    import importlib
    import subprocess
    import sys
    code = ("import sys, jaxprop; "
            "loaded = [m for m in sys.modules if m.startswith(('jaxprop.studies', 'jaxprop.complexity', "
            "'jaxprop.paths'))]; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)
    old_cx, old_px = importlib.import_module("jaxprop.complexity"), importlib.import_module("jaxprop.paths")
    for old, new in ((old_cx, cx), (old_px, px)):
        assert old.__all__ == new.__all__
        assert all(getattr(old, name) is getattr(new, name) for name in new.__all__)

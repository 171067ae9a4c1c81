"""conv1d / conv2d: forward semantics (padding modes, groups) and more gradient configurations.

The registry (tests/cases.py) runs the full generic checks on a few convolutions; here many
more configurations are compared with jax.vjp, jitted (one compile each, to stay fast).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop as jp


def max_rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_inputs(layer, in_shape, dtype, seed=0, **ctx):
    """Random params (normal, so scales are not all ones), x and dy, drawn with NumPy (no compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: layer.init(k, in_shape)[1], jax.random.key(0))
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.standard_normal(s.shape), dtype), shapes)
    x = jnp.asarray(rng.standard_normal(in_shape), dtype)
    y = jax.eval_shape(lambda p, xx: jp.call_forward(layer, p, xx, **ctx)[0], params, x)
    dy = jnp.asarray(rng.standard_normal(y.shape), dtype)              # random, never all ones
    return params, x, dy


def vjp_errors(layer, in_shape, dtype, seed=0, **ctx):
    """Relative errors of the hand-written (grads, dx) against jax.vjp of the same forward,
    both in one jitted function (one compile per configuration)."""
    params, x, dy = random_inputs(layer, in_shape, dtype, seed, **ctx)

    @jax.jit
    def both(p, xx, d):
        hand = layer.backward(jp.call_forward(layer, p, xx, **ctx)[1], d)
        ref = jax.vjp(lambda p_, x_: jp.call_forward(layer, p_, x_, **ctx)[0], p, xx)[1](d)
        return hand, ref

    with jax.default_matmul_precision("highest"):
        hand, ref = both(params, x, dy)
    return [max_rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(hand), jax.tree_util.tree_leaves(ref))]


CONFIGS = [
    # (layer, input shape, dtypes): odd sizes, strides that do not divide, dilation with stride, groups
    (lambda: jp.conv1d(4, 3, stride=3, padding="SAME"), (2, 10, 3), "f64 f32"),
    (lambda: jp.conv1d(4, 4, stride=2, padding="VALID", dilation=3), (3, 17, 2), "f64"),
    (lambda: jp.conv1d(2, 5, stride=4, padding="SAME", dilation=2), (2, 11, 3), "f64"),
    (lambda: jp.conv1d(6, 3, stride=2, padding=(3, 0), groups=3), (2, 9, 6), "f64"),
    (lambda: jp.conv1d(8, 5, groups=4, padding="CIRCULAR", dilation=2), (2, 7, 4), "f64 f32"),
    (lambda: jp.conv1d(2, 7, padding="CIRCULAR"), (2, 2, 1), "f64"),     # pads wider than the input: wraps twice
    (lambda: jp.conv2d(3, 3, stride=2, padding="VALID", dilation=2), (2, 9, 10, 2), "f64"),
    (lambda: jp.conv2d(4, (3, 2), stride=(3, 2), padding="CIRCULAR", dilation=(1, 2)), (2, 7, 8, 2), "f64 f32"),
    (lambda: jp.conv2d(6, 3, padding=((2, 0), (0, 1)), groups=2, stride=(2, 1)), (2, 6, 5, 4), "f64"),
    (lambda: jp.conv2d(6, 3, groups=6, padding="SAME"), (2, 5, 5, 6), "f64"),       # depthwise
]
TOL = {"f64": (jnp.float64, 1e-9), "f32": (jnp.float32, 1e-4)}


@pytest.mark.parametrize("i,dt", [(i, dt) for i, c in enumerate(CONFIGS) for dt in c[2].split()])
def test_gradients_match_vjp(i, dt):
    make, shape, _ = CONFIGS[i]
    dtype, tol = TOL[dt]
    errs = vjp_errors(make(), shape, dtype)
    assert max(errs) <= tol, errs


def naive_conv1d(x, w, b, stride, pads, dilation, groups):
    """Loops over the definition y[n,o,f] = sum_{k,i} xp[n, oS + kD, gC_g + i] W[k,i,f] + b[f]."""
    x, w = np.asarray(x), np.asarray(w)
    xp = np.pad(x, ((0, 0), pads, (0, 0)))
    k_size, c_g, f = w.shape
    f_g = f // groups
    out = (xp.shape[1] - (k_size - 1) * dilation - 1) // stride + 1
    y = np.zeros((x.shape[0], out, f))
    for o in range(out):
        for fo in range(f):
            g = fo // f_g
            for k in range(k_size):
                y[:, o, fo] += xp[:, o * stride + k * dilation, g * c_g:(g + 1) * c_g] @ w[k, :, fo]
    return y + (0 if b is None else np.asarray(b))


def test_forward_matches_definition():
    layer = jp.conv1d(6, 3, stride=2, padding=(2, 1), dilation=2, groups=3)
    p, x, _ = random_inputs(layer, (2, 11, 3), jnp.float64)
    np.testing.assert_allclose(layer.forward(p, x)[0], naive_conv1d(x, p["w"], p["b"], 2, (2, 1), 2, 3),
                               rtol=1e-12, atol=1e-12)


def test_same_padding_is_jax_same():
    for length, k, s, d in [(10, 3, 1, 1), (10, 4, 3, 1), (11, 3, 2, 2), (7, 5, 3, 2)]:
        layer = jp.conv1d(2, k, stride=s, dilation=d, padding="SAME", bias=False)
        assert jp.output_shape(layer, (1, length, 3)) == (1, -(-length // s), 2)      # ceil(L / S)
        p, x, _ = random_inputs(layer, (1, length, 3), jnp.float64)
        ref = lax.conv_general_dilated(x, p["w"], (s,), "SAME", rhs_dilation=(d,),
                                       dimension_numbers=("NWC", "WIO", "NWC"))
        np.testing.assert_allclose(layer.forward(p, x)[0], ref, rtol=1e-12, atol=1e-12)


def test_circular_padding_wraps_around():
    # CIRCULAR = wrap-pad by the SAME amounts, then a VALID convolution (Flax's meaning)
    layer = jp.conv2d(3, (3, 4), stride=(1, 2), padding="CIRCULAR", bias=False)
    p, x, _ = random_inputs(layer, (2, 5, 6, 2), jnp.float64)
    xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")   # SAME amounts: (1, 1), (1, 1)
    ref = lax.conv_general_dilated(xp, p["w"], (1, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(layer.forward(p, x)[0], ref, rtol=1e-12, atol=1e-12)
    # with stride 1 a circular convolution commutes with a circular shift of the input
    layer1 = jp.conv1d(2, 5, padding="CIRCULAR")
    p1, x1, _ = random_inputs(layer1, (2, 9, 1), jnp.float64)
    np.testing.assert_allclose(layer1.forward(p1, jnp.roll(x1, 3, axis=1))[0],
                               jnp.roll(layer1.forward(p1, x1)[0], 3, axis=1), rtol=1e-12, atol=1e-12)


def test_depthwise_is_per_channel():
    # groups = C: channel c of the output only sees channel c of the input
    layer = jp.conv1d(3, 3, groups=3, bias=False)
    p, x, _ = random_inputs(layer, (2, 8, 3), jnp.float64)
    y = np.asarray(layer.forward(p, x)[0])
    for c in range(3):
        np.testing.assert_allclose(y[..., c], naive_conv1d(x[..., c:c + 1], p["w"][:, :, c:c + 1], None,
                                                           1, (1, 1), 1, 1)[..., 0], rtol=1e-12, atol=1e-12)


def param_shapes(layer, in_shape):
    return jax.eval_shape(lambda k: layer.init(k, in_shape)[1], jax.random.key(0))


def test_param_shapes():
    p = param_shapes(jp.conv2d(5, 3, bias=False), (1, 4, 4, 2))
    assert set(p) == {"w"} and p["w"].shape == (3, 3, 2, 5)
    p = param_shapes(jp.conv1d(4, 3, groups=2), (1, 6, 6))
    assert p["w"].shape == (3, 3, 4) and p["b"].shape == (4,)


@pytest.mark.parametrize("make,x_shape,match", [
    (lambda: jp.conv1d(4, 3), (2, 10, 3, 1), r"conv1d.*\(N, L, C\).*\(2, 10, 3, 1\)"),
    (lambda: jp.conv2d(4, 3), (2, 10, 3), r"conv2d.*\(N, H, W, C\).*\(2, 10, 3\)"),
    (lambda: jp.conv1d(4, 3), (2, 10, 5), r"conv1d.*3 features.*\(2, 10, 5\)"),
    (lambda: jp.conv1d(4, 5, padding="VALID"), (2, 3, 3), r"conv1d.*smaller than the dilated kernel"),
])
def test_bad_input_names_layer_and_shape(make, x_shape, match):
    layer = make()
    p = param_shapes(layer, (2, 10, 3) if "conv1d" in layer.name else (2, 10, 3, 3))
    with pytest.raises(ValueError, match=match):
        layer.forward(p, jnp.zeros(x_shape))


def test_bad_dtype_and_hyperparameters():
    layer = jp.conv1d(4, 3)
    p = param_shapes(layer, (2, 10, 3))
    with pytest.raises(ValueError, match="conv1d.*float64.*float32"):
        layer.forward(p, jnp.zeros((2, 10, 3), jnp.float32))
    with pytest.raises(ValueError, match="conv1d.*floating"):
        layer.forward(p, jnp.zeros((2, 10, 3), jnp.int32))
    with pytest.raises(ValueError, match="groups"):
        jp.conv1d(5, 3, groups=2)
    with pytest.raises(ValueError, match="groups=2 must divide the input channels"):
        param_shapes(jp.conv1d(4, 3, groups=2), (2, 10, 3))
    with pytest.raises(ValueError, match="padding must be one of"):
        jp.conv2d(4, 3, padding="FULL")
    with pytest.raises(ValueError, match="padding amounts must be >= 0"):
        param_shapes(jp.conv1d(4, 3, padding=(-1, 0)), (2, 10, 3))
    with pytest.raises(ValueError, match="kernel_size must be an int or a tuple of 2"):
        jp.conv2d(4, (3, 3, 3))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        jp.conv1d(4, 3, stride=0)


def test_cache_is_arrays_and_jit_agrees():
    layer = jp.conv2d(3, 3, stride=2, padding="CIRCULAR")
    p, x, dy = random_inputs(layer, (2, 6, 5, 2), jnp.float64)
    y, cache = jax.jit(layer.forward)(p, x)
    assert all(isinstance(a, jax.Array) for a in jax.tree_util.tree_leaves(cache))
    g1, dx1 = jax.jit(layer.backward)(cache, dy)
    g2, dx2 = layer.backward(cache, dy)
    np.testing.assert_allclose(dx1, dx2, rtol=1e-12)
    np.testing.assert_allclose(g1["w"], g2["w"], rtol=1e-12)


def test_random_shift_rolls_each_example_and_back():
    layer = jp.random_shift(3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((6, 9, 2)))
    y, cache = layer.forward((), x, key=jax.random.key(0), train=True)
    shifts = np.asarray(cache["shifts"])[:, 0]
    assert np.all(np.abs(shifts) <= 3) and len(set(shifts.tolist())) > 1
    for n in range(6):
        np.testing.assert_array_equal(y[n], np.roll(np.asarray(x[n]), shifts[n], axis=0))
    assert max(vjp_errors(layer, (4, 7, 2), jnp.float64, key=jax.random.key(1), train=True)) <= 1e-12
    assert max(vjp_errors(jp.random_shift(2), (3, 5, 4, 1), jnp.float64, key=jax.random.key(2))) <= 1e-12
    y_eval, cache = layer.forward((), x, train=False)
    np.testing.assert_array_equal(y_eval, x)
    with pytest.raises(ValueError, match=r"random_shift\(3\).*key"):
        layer.forward((), x, train=True)


def test_cnn_model_specs():
    from jaxprop.models import build_model
    paper = build_model("cnn:c25k5s2p1-relu-c25k3s2p1-relu-c25k3s2p1-relu", 10)
    shapes = jax.eval_shape(lambda k: paper.init(k, (100, 40))[1], jax.random.key(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes)) == 5210   # the paper's count
    assert jp.output_shape(paper, (100, 40)) == (100, 10)
    bn = build_model("cnn:c8k5-bn-relu-mp2-c8k3-relu-gap:pad=circular:shift=2", 10)
    assert bn.stateful and bn.stochastic
    shapes = jax.eval_shape(lambda k: bn.init(k, (4, 40))[1], jax.random.key(0))
    assert "b" not in shapes[2] and "b" in shapes[6]          # no bias right before batch norm
    digits = build_model("cnn:c4k3-relu-ap2-gap:in=8x8x1", 10)
    assert jp.output_shape(digits, (5, 64)) == (5, 10)
    with pytest.raises(ValueError, match="unknown layer token 'c4x3'"):
        build_model("cnn:c4x3-relu", 10)

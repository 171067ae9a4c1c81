"""max_pool / avg_pool / global_avg_pool: tie-breaking, padding semantics, more gradient configurations."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprop as jp
from test_conv import random_inputs, vjp_errors

CONFIGS = [
    (lambda: jp.max_pool(2), (2, 9, 3), jnp.float64),                  # stride = window, odd length
    (lambda: jp.max_pool(3, 2, "SAME"), (2, 10, 3), jnp.float32),      # overlapping windows
    (lambda: jp.max_pool(4, 3, "CIRCULAR"), (2, 10, 2), jnp.float64),
    (lambda: jp.max_pool(3, 1, "SAME"), (2, 5, 6, 2), jnp.float64),    # every input in up to 9 windows
    (lambda: jp.max_pool((3, 2), (2, 3), "CIRCULAR"), (2, 7, 8, 1), jnp.float32),
    (lambda: jp.avg_pool(4, 3), (2, 11, 2), jnp.float64),
    (lambda: jp.avg_pool(3, 2, "CIRCULAR"), (2, 9, 2), jnp.float32),
    (lambda: jp.avg_pool((2, 3), (1, 2), ((1, 1), (0, 2))), (2, 5, 7, 2), jnp.float64),
    (lambda: jp.avg_pool(3, 2, ((1, 1), (1, 2)), count_include_pad=True), (2, 6, 7, 2), jnp.float32),
]


@pytest.mark.parametrize("i", range(len(CONFIGS)))
def test_gradients_match_vjp(i):
    make, shape, dtype = CONFIGS[i]
    assert max(vjp_errors(make(), shape, dtype)) <= (1e-9 if dtype == jnp.float64 else 1e-4)


def first_max_reference(x, window, stride, pads):
    """NumPy loops: each window sends dY to its first maximal tap in row-major window order."""
    x = np.asarray(x)
    nd = x.ndim - 2
    xp = np.pad(x, [(0, 0)] + list(pads) + [(0, 0)], constant_values=-np.inf)
    out = [(xp.shape[1 + a] - window[a]) // stride[a] + 1 for a in range(nd)]

    def backward(dy):
        dxp = np.zeros_like(xp)
        for n, c in itertools.product(range(x.shape[0]), range(x.shape[-1])):
            for o in itertools.product(*(range(k) for k in out)):
                taps = list(itertools.product(*(range(k) for k in window)))     # row-major order
                vals = [xp[(n,) + tuple(oi * s + ki for oi, s, ki in zip(o, stride, k)) + (c,)] for k in taps]
                k = taps[int(np.argmax(vals))]                                # argmax: first maximum
                dxp[(n,) + tuple(oi * s + ki for oi, s, ki in zip(o, stride, k)) + (c,)] += dy[(n,) + o + (c,)]
        return dxp[(slice(None),) + tuple(slice(lo, lo + x.shape[1 + a]) for a, (lo, _) in enumerate(pads))]

    return backward


TIE_CONFIGS = [((3, 12, 2), 3, 1, "VALID"), ((2, 11, 2), 4, 2, "SAME"),
               ((2, 6, 7, 2), (3, 3), (1, 2), "VALID"), ((2, 7, 7, 1), (2, 3), (2, 1), "SAME")]


@pytest.mark.parametrize("shape,window,stride,padding,jit",
                         [c + (True,) for c in TIE_CONFIGS] + [TIE_CONFIGS[1] + (False,)])
def test_max_pool_ties_go_to_first_maximum_like_jax_grad(shape, window, stride, padding, jit):
    """Inputs drawn from {0, 1}: most windows hold several equal maxima. Integer dy makes every
    sum exact, so the hand gradient must equal jax.grad's bit for bit."""
    layer = jp.max_pool(window, stride, padding)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, 2, shape), jnp.float64)
    y, cache = layer.forward((), x)
    dy = jnp.asarray(rng.integers(1, 10, y.shape), jnp.float64)
    nd = len(shape) - 2
    win = (window,) * nd if isinstance(window, int) else window
    st = (stride,) * nd if isinstance(stride, int) else stride
    # jax.grad of lax.reduce_window(max) written here, independently of the layer
    ref_fn = lambda xx: lax.reduce_window(xx, -jnp.inf, lax.max, (1,) + win + (1,), (1,) + st + (1,), padding)
    back = (jax.jit(layer.backward) if jit else layer.backward)
    ref = jax.vjp(jax.jit(ref_fn) if jit else ref_fn, x)[1](dy)[0]
    dx = back(cache, dy)[1]
    np.testing.assert_array_equal(y, ref_fn(x))
    np.testing.assert_array_equal(dx, ref)
    pads = lax.padtype_to_pads(shape[1:-1], win, st, padding)
    np.testing.assert_array_equal(dx, first_max_reference(x, win, st, pads)(np.asarray(dy)))
    assert float(jnp.sum(dx)) == float(jnp.sum(dy))        # each window routes all of its dY, once


def test_max_pool_ties_not_split():
    # jnp.max over an axis would split a tie equally; max_pool gives it all to the first tap
    layer = jp.max_pool(2)
    x = jnp.array([[[1.0], [1.0], [3.0], [2.0]]])
    y, cache = layer.forward((), x)
    np.testing.assert_array_equal(layer.backward(cache, jnp.array([[[5.0], [7.0]]]))[1][0, :, 0], [5, 0, 7, 0])


def test_avg_pool_padding_counts():
    x = jnp.arange(1.0, 6.0).reshape(1, 5, 1)
    # SAME with window 3, stride 2: pads (1, 1); windows [pad,1,2], [2,3,4], [4,5,pad]
    y_excl = jp.avg_pool(3, 2, "SAME").forward((), x)[0][0, :, 0]
    y_incl = jp.avg_pool(3, 2, "SAME", count_include_pad=True).forward((), x)[0][0, :, 0]
    y_circ = jp.avg_pool(3, 2, "CIRCULAR").forward((), x)[0][0, :, 0]
    np.testing.assert_allclose(y_excl, [1.5, 3.0, 4.5])
    np.testing.assert_allclose(y_incl, [1.0, 3.0, 3.0])
    np.testing.assert_allclose(y_circ, [8 / 3, 3.0, 10 / 3])          # wraps: [5,1,2], [2,3,4], [4,5,1]


def test_max_pool_same_is_reduce_window_same():
    layer = jp.max_pool((3, 2), (2, 2), "SAME")
    _, x, _ = random_inputs(layer, (2, 7, 5, 3), jnp.float64)
    ref = lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 2, 1), (1, 2, 2, 1), "SAME")
    np.testing.assert_array_equal(layer.forward((), x)[0], ref)


def test_global_avg_pool():
    layer = jp.global_avg_pool()
    _, x, dy = random_inputs(layer, (2, 3, 4, 5), jnp.float64)
    y, cache = layer.forward((), x)
    np.testing.assert_allclose(y, np.asarray(x).mean(axis=(1, 2)))
    np.testing.assert_allclose(layer.backward(cache, dy)[1], np.broadcast_to(np.asarray(dy)[:, None, None] / 12,
                                                                             x.shape))


def test_output_shapes_and_rank_from_input():
    assert jp.output_shape(jp.max_pool(2), (4, 9, 3)) == (4, 4, 3)
    assert jp.output_shape(jp.max_pool(2), (4, 9, 8, 3)) == (4, 4, 4, 3)
    assert jp.output_shape(jp.avg_pool(3, 2, "SAME"), (4, 9, 8, 3)) == (4, 5, 4, 3)
    assert jp.output_shape(jp.avg_pool((2, 4), padding="CIRCULAR"), (4, 9, 8, 3)) == (4, 5, 2, 3)
    assert jp.output_shape(jp.global_avg_pool(), (4, 9, 8, 3)) == (4, 3)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"max_pool.*\(N, L, C\) or \(N, H, W, C\).*\(2, 9\)"):
        jp.max_pool(2).forward((), jnp.zeros((2, 9)))
    with pytest.raises(ValueError, match=r"avg_pool: window must be an int or a tuple of 1 int \(one per spatial axis\), got \(2, 2\)"):
        jp.avg_pool((2, 2)).forward((), jnp.zeros((2, 9, 3)))
    with pytest.raises(ValueError, match=r"max_pool.*smaller than the window"):
        jp.max_pool(4).forward((), jnp.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match=r"max_pool.*padding.*smaller than the window"):
        jp.max_pool(2, padding=((2, 0),)).forward((), jnp.zeros((2, 8, 1)))
    with pytest.raises(ValueError, match=r"avg_pool.*floating"):
        jp.avg_pool(2).forward((), jnp.zeros((2, 8, 1), jnp.int32))
    with pytest.raises(ValueError, match=r"global_avg_pool.*\(2, 5\)"):
        jp.global_avg_pool().forward((), jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"max_pool: window must be an int or a tuple of 1 or 2"):
        jp.max_pool((2, 2, 2))
    with pytest.raises(ValueError, match=r"padding must be one of"):
        jp.avg_pool(2, padding="REFLECT")

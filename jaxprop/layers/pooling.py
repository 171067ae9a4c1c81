r"""Pooling layers: max and average over windows (1-D or 2-D), and global average.

Inputs are channels-last, (N, L, C) or (N, H, W, C); the number of spatial
axes d is read from the input's rank. Derivation for one spatial axis (2-D
pooling does it on both axes). After padding x to xp (N, Lp, C), output
position o of a window of K taps and stride S reads the taps
xp[o S + k], k < K, so the k-th tap of every output is the strided view
``V_k = xp[:, k :: S][:, :O]`` (N, O, C), O = floor((Lp - K) / S) + 1.

Forward::

    max:  y[n, o, c] = max_k V_k[n, o, c]
    avg:  y[n, o, c] = (1 / m_o) sum_k V_k[n, o, c]     m_o = number of taps averaged

Backward. Each tap of each window is a path from xp[p] to y[o] with
p = o S + k; the gradient sums over the windows that contain p (windows
overlap when S < K)::

    dxp[n, p, c] = sum_{o, k : o S + k = p} dY[n, o, c] * dy[o]/dV_k[o]
    avg:  dy[o]/dV_k[o] = 1 / m_o
    max:  dy[o]/dV_k[o] = 1 if tap k is the window's chosen maximum, else 0

Written densely: ``dxp = sum_k T_k(dY * dy/dV_k)``, where T_k, the transpose
of taking the strided view V_k, puts entry o back at position k + o S with
zeros between (``lax.pad`` with S - 1 interior zeros). The padding's rows of
dxp are then dropped (zero/-inf padding) or folded back (circular padding).

Max-pool ties: when several taps of a window hold the maximum, the whole
dY[o] goes to the *first* of them in row-major window order (smallest k;
in 2-D smallest kh, then smallest kw). That is the choice ``jax.grad`` makes
for ``lax.reduce_window`` with ``lax.max`` (XLA's select-and-scatter with a
``>=`` selector keeps the first maximum), the forward used here; it is a
valid subgradient, and tests/test_pooling.py checks it on tied inputs.
(``jnp.max`` over an axis differs: its gradient splits ties equally.)
"""
from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprop.core import Layer, check_float, check_same_shape, shape_token, token_shape
from jaxprop.layers import spatial as sp
from jaxprop.layers._params import check_no_params


def _pool_geometry(name, x_shape, window, stride, padding):
    """Static geometry of a pooling window on an input of shape (N, *spatial, C)."""
    if len(x_shape) not in (3, 4):
        raise ValueError(f"{name}: expected input of shape (N, L, C) or (N, H, W, C) (channels last), "
                         f"got shape {tuple(x_shape)}")
    nd = len(x_shape) - 2
    spatial = tuple(x_shape[1:-1])
    ks = sp.as_tuple(window, nd, "window", name)
    st = sp.as_tuple(stride if stride is not None else window, nd, "stride", name)
    pads, circular = sp.resolve_padding(padding, spatial, ks, st, (1,) * nd, name)
    if not circular and any(lo >= k or hi >= k for (lo, hi), k in zip(pads, ks)):
        raise ValueError(f"{name}: padding {pads} must be smaller than the window {ks} on each side "
                         "(a window of padding only has no value)")
    out = tuple(sp.out_size(n, p, k, s) for n, p, k, s in zip(spatial, pads, ks, st))
    if any(o < 1 for o in out):
        raise ValueError(f"{name}: input of spatial size {spatial} is smaller than the window {ks} "
                         f"after padding {pads}")
    return nd, spatial, ks, st, pads, circular, out


def _pad(x, pads, circular, fill):
    if circular:
        return sp.wrap_pad(x, pads)
    return lax.pad(x, jnp.asarray(fill, x.dtype), [(0, 0, 0)] + [(lo, hi, 0) for lo, hi in pads] + [(0, 0, 0)])


def _unpad(dxp, pads, circular, spatial):
    """Transpose of :func:`_pad`: fold (circular) or crop (constant fill)."""
    if circular:
        return sp.wrap_pad_backward(dxp, pads, spatial)
    return lax.pad(dxp, jnp.zeros((), dxp.dtype), [(0, 0, 0)] + [(-lo, -hi, 0) for lo, hi in pads] + [(0, 0, 0)])


def _check_window(name, window, stride):
    """Construction-time check; the number of spatial axes is known only from the input."""
    for what, v in (("window", window), ("stride", stride)):
        if v is None and what == "stride":
            continue
        n = 1 if isinstance(v, (int, np.integer)) else len(tuple(v)) if isinstance(v, (tuple, list)) else 0
        if n not in (1, 2):
            raise ValueError(f"{name}: {what} must be an int or a tuple of 1 or 2 ints, got {v!r}")
        sp.as_tuple(v, n, what, name)


def _pool_init(name, window, stride, padding):
    def init(key, in_shape):
        del key
        in_shape = tuple(in_shape)
        _, _, _, _, _, _, out = _pool_geometry(name, in_shape, window, stride, padding)
        return (in_shape[0],) + out + (in_shape[-1],), ()
    return init


def max_pool(window, stride=None, padding="VALID") -> Layer:
    r"""Max pooling over windows, 1-D (N, L, C) or 2-D (N, H, W, C), per channel.

    Forward (module docstring): ``y[n, o, c] = max_k xp[n, o S + k, c]``,
    computed by ``lax.reduce_window(max)``; padding is filled with -inf, so
    it never wins. Output (N, O..., C).

    Backward: dY[n, o, c] goes to the tap that holds the maximum -- the first
    one in row-major window order on ties, as ``jax.grad`` -- and the
    contributions of overlapping windows add::

        dX[n, p, c] = sum_{o : p = o S + k*(o)} dY[n, o, c],
        k*(o) = min{k : xp[n, o S + k, c] = y[n, o, c]}

    Args:
      window: K, an int (every spatial axis) or a tuple.
      stride: S, an int or a tuple; default ``window`` (non-overlapping).
      padding: ``"VALID"`` (default), ``"SAME"``, ``"CIRCULAR"`` or explicit
        (lo, hi) pairs (each side smaller than the window).

    No parameters: params and grads are ``()``.
    """
    name = "max_pool"
    padding = sp.check_padding_spec(padding, name)
    _check_window(name, window, stride)

    def forward(params, x):
        check_no_params(name, params)
        check_float(name, x)
        nd, spatial, ks, st, pads, circular, out = _pool_geometry(name, np.shape(x), window, stride, padding)
        xp = _pad(x, pads, circular, -jnp.inf)
        # a NumPy init value: concrete under jit, so lax recognises the (max, -inf) monoid
        y = lax.reduce_window(xp, np.array(-np.inf, x.dtype), lax.max, (1,) + ks + (1,),
                              (1,) + st + (1,), "VALID")
        return y, {"x": xp, "y": y, "x_shape": shape_token(x)}

    def backward(cache, dy):
        xp, y = cache["x"], cache["y"]
        x_shape = token_shape(cache["x_shape"])
        nd, spatial, ks, st, pads, circular, out = _pool_geometry(name, x_shape, window, stride, padding)
        check_same_shape(name, y, dy)
        zero = jnp.zeros((), dy.dtype)
        taken = jnp.zeros(y.shape, bool)             # has this window's maximum been routed yet?
        dxp = jnp.zeros(xp.shape, dy.dtype)
        for offset in itertools.product(*(range(k) for k in ks)):       # row-major window order
            # forward was: y = max_k V_k; the first tap equal to the max takes dY
            hit = (sp.strided_view(xp, offset, out, st) == y) & ~taken
            taken = taken | hit
            dxp = dxp + sp.strided_view_backward(jnp.where(hit, dy, zero), offset, xp.shape[1:-1], st)
        return (), _unpad(dxp, pads, circular, spatial)   # forward was: xp = pad(x, -inf)

    return Layer(_pool_init(name, window, stride, padding), forward, backward, name=name)


def avg_pool(window, stride=None, padding="VALID", *, count_include_pad: bool = False) -> Layer:
    r"""Average pooling over windows, 1-D (N, L, C) or 2-D (N, H, W, C), per channel.

    Forward (module docstring)::

        y[n, o, c] = (1 / m_o) sum_k xp[n, o S + k, c]

    with m_o the number of taps of window o that lie inside x (zero padding
    is not counted, as TensorFlow/Keras for "SAME"); ``count_include_pad=True``
    divides by the full window size prod(K) (as Flax's default). Circular
    padding is real data, so m_o = prod(K) there.

    Backward: every tap of window o receives dY[n, o, c] / m_o; overlapping
    windows add::

        dX[n, p, c] = sum_{o, k : o S + k = p} dY[n, o, c] / m_o

    Args: as :func:`max_pool`. No parameters: params and grads are ``()``.
    """
    name = "avg_pool"
    padding = sp.check_padding_spec(padding, name)
    _check_window(name, window, stride)

    def counts(x_shape, dtype):
        """m_o, a static (1, O..., 1) array: taps of each window that are real data."""
        nd, spatial, ks, st, pads, circular, out = _pool_geometry(name, x_shape, window, stride, padding)
        if circular or count_include_pad:
            return np.full((1,) + out + (1,), float(np.prod(ks)), dtype)
        m = np.ones((), dtype)
        for axis, (n, (lo, hi), k, s, o) in enumerate(zip(spatial, pads, ks, st, out)):
            start = np.arange(o) * s - lo                      # first tap of window o, in x's coordinates
            inside = np.clip(start + k, 0, n) - np.clip(start, 0, n)
            shape = [1] * (nd + 2)
            shape[axis + 1] = o
            m = m * inside.reshape(shape).astype(dtype)
        return m

    def forward(params, x):
        check_no_params(name, params)
        check_float(name, x)
        nd, spatial, ks, st, pads, circular, out = _pool_geometry(name, np.shape(x), window, stride, padding)
        xp = _pad(x, pads, circular, 0.0)
        total = lax.reduce_window(xp, np.zeros((), x.dtype), lax.add, (1,) + ks + (1,),
                                  (1,) + st + (1,), "VALID")
        y = total / jnp.asarray(counts(x.shape, np.dtype(x.dtype)))
        return y, {"x_shape": shape_token(x)}

    def backward(cache, dy):
        x_shape = token_shape(cache["x_shape"])
        nd, spatial, ks, st, pads, circular, out = _pool_geometry(name, x_shape, window, stride, padding)
        check_same_shape(name, (x_shape[0],) + out + (x_shape[-1],), dy)
        g = dy / jnp.asarray(counts(x_shape, np.dtype(dy.dtype)))   # forward was: y = total / m
        padded = tuple(n + lo + hi for n, (lo, hi) in zip(spatial, pads))
        dxp = jnp.zeros((x_shape[0],) + padded + (x_shape[-1],), dy.dtype)
        for offset in itertools.product(*(range(k) for k in ks)):
            # forward was: total = sum_k V_k   (each tap gets the window's gradient)
            dxp = dxp + sp.strided_view_backward(g, offset, padded, st)
        return (), _unpad(dxp, pads, circular, spatial)   # forward was: xp = pad(x, 0)

    return Layer(_pool_init(name, window, stride, padding), forward, backward, name=name)


def global_avg_pool() -> Layer:
    r"""Mean over every spatial axis: (N, L..., C) -> (N, C).

    Forward: ``y[n, c] = (1 / P) sum_p x[n, p, c]`` with P = L (or H W).
    Backward: every position received the same weight 1/P, so
    ``dX[n, p, c] = dY[n, c] / P`` (dY broadcast over the positions).
    No parameters.
    """
    name = "global_avg_pool"

    def init(key, in_shape):
        del key
        in_shape = tuple(in_shape)
        if len(in_shape) < 3:
            raise ValueError(f"{name}: expected in_shape (N, spatial..., C), got {in_shape}")
        return (in_shape[0], in_shape[-1]), ()

    def forward(params, x):
        check_no_params(name, params)
        check_float(name, x)
        if np.ndim(x) < 3:
            raise ValueError(f"{name}: expected input of shape (N, spatial..., C) (rank >= 3, channels last), "
                             f"got shape {tuple(np.shape(x))}")
        return x.mean(axis=tuple(range(1, x.ndim - 1))), {"x_shape": shape_token(x)}

    def backward(cache, dy):
        x_shape = token_shape(cache["x_shape"])
        check_same_shape(name, (x_shape[0], x_shape[-1]), dy)
        positions = int(np.prod(x_shape[1:-1]))
        # forward was: y = x.mean(spatial axes)
        dx = jnp.broadcast_to(dy.reshape((x_shape[0],) + (1,) * (len(x_shape) - 2) + (x_shape[-1],)), x_shape)
        return (), dx / positions

    return Layer(init, forward, backward, name=name)

"""Fully connected (affine) layer."""
from __future__ import annotations

import jax.numpy as jnp

from jaxprop import initializers
from jaxprop.core import (Layer, check_float, check_input, check_same_shape, default_float, matmul, matmul_nt,
                          matmul_tn)
from jaxprop.layers._params import BIAS_NOTES, check_params


def dense(features: int, *, bias: bool = True, w_init="glorot", dtype=None) -> Layer:
    r"""Affine map ``y = x W + b``.

    Shapes: x (N, ..., I), W (I, O), b (O,), y (N, ..., O). Leading axes are
    flattened into M rows for the derivation: X (M, I), dY (M, O).

    Forward::

        Y = X W + 1 b^T            Y_mj = sum_i X_mi W_ij + b_j

    Backward (each from dJ/dY_mj and the forward line above)::

        dX = dY W^T                (M, O) @ (O, I) -> (M, I)    dX_mi = sum_j dY_mj W_ij
        dW = X^T dY                (I, M) @ (M, O) -> (I, O)    dW_ij = sum_m X_mi dY_mj
        db = dY^T 1 = sum_m dY_m   (O,)                         db_j  = sum_m dY_mj

    ``dW`` sums over the batch because every row of X shares the one W (fan-out
    of W to M rows: the chain rule sums over paths).

    Per example (:mod:`jaxprop.per_example`; x (N, T..., I) seen as X_n
    (T, I) per example, dY_n (T, O), T = 1 for a 2-D x)::

        dW_n = X_n^T dY_n   (N, I, O)           db_n = sum_t dY_n[t]   (N, O)
        ||dW_n||^2 = ||x_n||^2 ||dy_n||^2                   (T = 1: no (N, I, O) array)
                   = <X_n X_n^T, dY_n dY_n^T>_F             (T > 1, Li et al. 2022: (N, T, T))

    (the norms form ``||X^T dY||^2 = tr(dY^T X X^T dY)``; when 2 T^2 > I O
    the (N, I, O) gradients are the smaller array and are used instead).

    Args:
      features: O, the number of outputs.
      bias: whether to add ``b``; without it params are ``{"w"}`` only.
      w_init: ``"glorot"`` (default), ``"he"``, ``"lecun"`` or a function
        ``(key, shape, dtype, fan_in, fan_out)``; ``b`` starts at zero.
      dtype: parameter dtype (default: float64 under x64, else float32). The
        input must have the same dtype.

    The three products go through :func:`jaxprop.core.matmul` (``matmul_nt`` for
    dX, ``matmul_tn`` for dW): under ``jax.default_matmul_precision("bfloat16")``
    float32 operands are rounded to bfloat16 and summed in float32, on CPU too.

    Params: ``{"w": (I, O), "b": (O,)}``, checked in ``forward`` (at trace time):
    the keys, O, one floating dtype, and the input's I and dtype against them.
    """
    name = f"dense({features})"
    init_w = initializers.get(w_init)
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"dense: features must be a positive int, got {features!r}")

    def init(key, in_shape):
        if len(in_shape) < 2:
            raise ValueError(f"{name}: in_shape must include the batch axis, (N, ..., I); got {tuple(in_shape)}")
        dt = dtype or default_float()
        n_in = in_shape[-1]
        params = {"w": init_w(key, (n_in, features), dt, n_in, features)}
        if bias:
            params["b"] = jnp.zeros((features,), dt)
        return tuple(in_shape[:-1]) + (features,), params

    spec = {"w": ("I", features), "b": (features,)} if bias else {"w": ("I", features)}

    def forward(params, x):
        sizes, dt = check_params(name, params, spec, notes=BIAS_NOTES[bias])
        check_float(name, x)
        check_input(name, x, min_ndim=2, last=sizes["I"], dtype=dt)
        w = params["w"]
        y = matmul(x, w)
        if bias:
            y = y + params["b"].reshape((1,) * (y.ndim - 1) + (features,))  # b[None, :]
        return y, {"x": x, "w": w}

    def backward(cache, dy):
        x, w = cache["x"], cache["w"]
        check_same_shape(name, x.shape[:-1] + (w.shape[1],), dy)
        x2 = x.reshape(-1, w.shape[0])          # (M, I)
        dy2 = dy.reshape(-1, w.shape[1])        # (M, O)
        grads = {"w": matmul_tn(x2, dy2)}       # forward was: y = x @ w
        if bias:
            grads["b"] = dy2.sum(axis=0)        # forward was: y = ... + b[None, :]
        dx = matmul_nt(dy, w)                   # (..., O) @ (O, I)
        return grads, dx

    def rows(cache, dy):
        """X_n (N, T, I) and dY_n (N, T, O): each example's T rows (T = 1 for 2-D x)."""
        x, w = cache["x"], cache["w"]
        check_same_shape(name, x.shape[:-1] + (w.shape[1],), dy)
        n = x.shape[0]
        return x.reshape(n, -1, w.shape[0]), dy.reshape(n, -1, w.shape[1])

    def per_example(cache, dy):
        x3, dy3 = rows(cache, dy)
        grads = {"w": jnp.einsum("nti,nto->nio", x3, dy3)}     # forward was: y = x @ w, per example
        if bias:
            grads["b"] = dy3.sum(axis=1)                        # forward was: y = ... + b[None, :]
        return grads, backward(cache, dy)[1]

    def per_example_norms(cache, dy):
        x3, dy3 = rows(cache, dy)
        (n, t, i), o = x3.shape, dy3.shape[-1]
        if t == 1:                              # ||x_n dy_n^T||^2 = ||x_n||^2 ||dy_n||^2
            sq = (x3 * x3).sum(axis=(1, 2)) * (dy3 * dy3).sum(axis=(1, 2))
        elif 2 * t * t <= i * o:                # <X_n X_n^T, dY_n dY_n^T>: two (N, T, T), not (N, I, O)
            sq = jnp.einsum("nts,nts->n", x3 @ x3.transpose(0, 2, 1), dy3 @ dy3.transpose(0, 2, 1))
        else:                                   # T^2 > I O: the (N, I, O) gradients are the smaller array
            dw = jnp.einsum("nti,nto->nio", x3, dy3)
            sq = (dw * dw).sum(axis=(1, 2))
        if bias:
            db = dy3.sum(axis=1)
            sq = sq + (db * db).sum(axis=1)
        return sq, backward(cache, dy)[1]

    return Layer(init, forward, backward, name=name, per_example=per_example,
                 per_example_norms=per_example_norms)

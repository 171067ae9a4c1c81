r"""Elementwise activations and the softmax family.

For an elementwise y = f(x) the Jacobian is diagonal, so the backward pass is
the product ``dx = dy * f'(x)`` (shapes: x, y, dy, dx all (N, ...)). Each
layer caches the cheapest thing its derivative can be written in (often y
itself). None has parameters: params and grads are ``()``.

| layer        | forward y = f(x)                      | f'(x) written as                         |
|--------------|---------------------------------------|------------------------------------------|
| identity     | x                                     | 1                                        |
| sigmoid      | 1 / (1 + e^-x)                        | y (1 - y)                                |
| tanh         | tanh x                                | 1 - y^2                                  |
| relu         | max(x, 0)  (NaN stays NaN)            | 1[x > 0] = 1[y > 0]  (0 at x = 0, NaN)   |
| leaky_relu   | x if x >= 0 else a x                  | 1 if x >= 0 else a  (as jax.nn)          |
| elu          | x if x > 0 else a (e^x - 1)           | 1 if x > 0 else y + a                    |
| softplus     | log(1 + e^x)                          | sigmoid(x)                               |
| gelu exact   | x Phi(x)                              | Phi(x) + x phi(x)                        |
| gelu tanh    | x/2 (1 + tanh u), u = c (x + k x^3)   | (1 + t)/2 + x/2 (1 - t^2) c (1 + 3k x^2) |
| silu         | x sigmoid(x)                          | s (1 + x (1 - s)), s = sigmoid(x)        |

with Phi/phi the standard normal cdf/pdf, c = sqrt(2/pi), k = 0.044715, t = tanh u.

NaN propagates as through ``jax.grad`` of the same ``jax.nn`` function: a NaN
input gives a NaN output, and dx is what ``jax.vjp`` gives (NaN for the smooth
functions; for relu, 0, since jax.nn.relu's derivative 1[x > 0] is 0 at NaN).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, check_float, check_same_shape, shape_token, token_shape


def _no_params(name):
    def init(key, in_shape):
        del key
        return tuple(in_shape), ()
    return init


def elementwise(name: str, fn, dfn) -> Layer:
    """A parameterless elementwise layer from ``fn(x) -> (y, cache)`` and
    ``dfn(cache, dy) -> dx``. Used by every activation below; users can build
    their own the same way."""

    def forward(params, x):
        del params
        check_float(name, x)
        y, cache = fn(x)
        return y, {"c": cache, "y_shape": shape_token(y)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        return (), dfn(cache["c"], dy)

    return Layer(_no_params(name), forward, backward, name=name)


def identity() -> Layer:
    """y = x; dx = dy."""
    return elementwise("identity", lambda x: (x, ()), lambda c, dy: dy)


def sigmoid() -> Layer:
    """y = 1/(1+e^-x); dx = dy * y * (1 - y)."""
    def fn(x):
        y = jax.nn.sigmoid(x)
        return y, y
    return elementwise("sigmoid", fn, lambda y, dy: dy * y * (1 - y))


def tanh() -> Layer:
    """y = tanh(x); dx = dy * (1 - y^2)."""
    def fn(x):
        y = jnp.tanh(x)
        return y, y
    return elementwise("tanh", fn, lambda y, dy: dy * (1 - y * y))


def relu(save: str = "mask") -> Layer:
    """y = max(x, 0); dx = dy * 1[x > 0] = dy * 1[y > 0]. At x = 0 the
    gradient is 0, as ``jax.nn.relu`` (``jnp.maximum`` would give 0.5 there).
    A NaN input gives y = NaN and dx = 0, as ``jax.nn.relu`` and its
    ``jax.vjp`` (the NaN is not hidden as a 0 output).

    Args:
      save: what the forward pass keeps for the backward one.
        ``"mask"`` (default): the boolean ``x > 0``, as autodiff does. Under
        jit XLA fuses the comparison into the backward pass, so in practice
        the float pre-activation x stays alive until the backward pass.
        ``"output"``: y itself (y > 0 exactly where x > 0). y is held anyway
        by the layer after (a dense layer caches its input for dW), so x dies
        in the forward pass: one (N, ...) float buffer less per relu.

    Which is faster depends on the backend's executor, not on the
    arithmetic (both read one array in the backward pass). On XLA's CPU
    runtime, which runs independent kernels concurrently, the smaller live
    set of ``"output"`` lets the buffer assignment reuse two slots for the
    whole backward chain, so each dW matmul must finish before the next
    relu backward may overwrite its input: on 2 cores an MLP training step
    measured up to 1.2x jax.grad's time with ``"output"`` (``"mask"``:
    0.97-1.03x), and 0.94x on 1 core (docs/performance.md). ``"output"`` is the choice where memory binds,
    and inside ``repeat``, whose loop cannot keep x alive for free."""
    if save not in ("mask", "output"):
        raise ValueError(f"relu: save must be 'mask' or 'output', got {save!r}")
    zero = lambda a: jnp.zeros((), a.dtype)

    def forward(x, mask):
        # x > 0 is False for NaN: the inner where keeps NaN as NaN (a constant, so the autodiff
        # derivative is 1[x > 0] everywhere, 0 at NaN, as jax.nn.relu's); finite x: max(x, 0)
        return jnp.where(mask, x, jnp.where(jnp.isnan(x), jnp.full((), jnp.nan, x.dtype), zero(x)))

    if save == "output":
        def fn(x):
            y = forward(x, x > 0)
            return y, y
        return elementwise("relu", fn, lambda y, dy: jnp.where(y > 0, dy, zero(dy)))

    def fn_mask(x):
        mask = x > 0
        return forward(x, mask), mask
    return elementwise("relu", fn_mask, lambda mask, dy: jnp.where(mask, dy, zero(dy)))


def leaky_relu(negative_slope: float = 0.01) -> Layer:
    """y = x if x >= 0 else a x; dx = dy if x >= 0 else a dy (as ``jax.nn.leaky_relu``)."""
    a = negative_slope
    def fn(x):
        mask = x >= 0
        return jnp.where(mask, x, a * x), mask
    return elementwise(f"leaky_relu({a})", fn, lambda mask, dy: jnp.where(mask, dy, a * dy))


def elu(alpha: float = 1.0) -> Layer:
    """y = x if x > 0 else a (e^x - 1); dx = dy if x > 0 else dy (y + a)."""
    a = alpha
    def fn(x):
        mask = x > 0
        y = jnp.where(mask, x, a * jnp.expm1(jnp.where(mask, jnp.zeros((), x.dtype), x)))
        return y, (mask, y)
    def dfn(c, dy):
        mask, y = c
        return jnp.where(mask, dy, dy * (y + a))
    return elementwise(f"elu({a})", fn, dfn)


def softplus() -> Layer:
    """y = log(1 + e^x), computed as logaddexp(x, 0) (finite for |x| = 1000);
    dx = dy * sigmoid(x)."""
    def fn(x):
        return jnp.logaddexp(x, jnp.zeros((), x.dtype)), x
    return elementwise("softplus", fn, lambda x, dy: dy * jax.nn.sigmoid(x))


def gelu(approximate: bool = False) -> Layer:
    """Gaussian error linear unit; ``approximate=True`` is the tanh form
    (as ``jax.nn.gelu(approximate=True)``), default the exact erf form."""
    c = math.sqrt(2.0 / math.pi)
    k = 0.044715
    if approximate:
        def fn(x):
            t = jnp.tanh(c * (x + k * x ** 3))
            return 0.5 * x * (1 + t), (x, t)
        def dfn(cache, dy):
            x, t = cache
            return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * k * x * x))
        return elementwise("gelu(tanh)", fn, dfn)

    def fn(x):
        cdf = 0.5 * (1 + jax.lax.erf(x / math.sqrt(2.0)))
        return x * cdf, (x, cdf)
    def dfn(cache, dy):
        x, cdf = cache
        pdf = jnp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return dy * (cdf + x * pdf)
    return elementwise("gelu", fn, dfn)


def silu() -> Layer:
    """y = x sigmoid(x) (swish); dx = dy * s (1 + x (1 - s)), s = sigmoid(x)."""
    def fn(x):
        s = jax.nn.sigmoid(x)
        return x * s, (x, s)
    def dfn(cache, dy):
        x, s = cache
        return dy * s * (1 + x * (1 - s))
    return elementwise("silu", fn, dfn)


def softmax(axis: int = -1) -> Layer:
    r"""y = softmax(x) along ``axis``: y_i = e^{x_i} / sum_k e^{x_k} (max-shifted).

    The Jacobian is full, dy_i/dx_j = y_i (delta_ij - y_j), so the
    vector-Jacobian product is::

        dx_j = sum_i dy_i y_i (delta_ij - y_j) = y_j (dy_j - sum_i dy_i y_i)

    shapes: all (N, ..., C); the sum runs over ``axis`` (keepdims).
    """
    def fn(x):
        y = jax.nn.softmax(x, axis=axis)
        return y, y
    def dfn(y, dy):
        return y * (dy - jnp.sum(dy * y, axis=axis, keepdims=True))
    return elementwise("softmax", fn, dfn)


def log_softmax(axis: int = -1) -> Layer:
    r"""y = x - logsumexp(x) along ``axis``.

    dy_i/dx_j = delta_ij - p_j with p = softmax(x) = e^y, so::

        dx_j = dy_j - p_j sum_i dy_i
    """
    def fn(x):
        y = jax.nn.log_softmax(x, axis=axis)
        return y, y
    def dfn(y, dy):
        return dy - jnp.exp(y) * jnp.sum(dy, axis=axis, keepdims=True)
    return elementwise("log_softmax", fn, dfn)

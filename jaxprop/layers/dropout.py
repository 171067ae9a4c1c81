"""Inverted dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, check_float, check_same_shape, require_key, shape_token


def _after(key, dy):
    """``key``, made to depend on ``dy`` through a zero XLA does not fold.

    Without it the backward draw depends on the key alone: XLA merges it with the
    forward's draw (common subexpression) or schedules it in the forward pass, and the
    random bits stay alive across the passes, more memory than the mask. With it, the
    draw starts once dy exists. (``lax.optimization_barrier`` does not do this on XLA's
    CPU backend: it is removed before scheduling.) The value is the same key.
    """
    if dy.size == 0:
        return key
    width = 8 * dy.dtype.itemsize
    u = jax.lax.bitcast_convert_type(dy.reshape(-1)[0], jnp.dtype(f"uint{width}"))
    zero = ((u >> (width // 2)) >> (width // 2)).astype(jnp.uint32)   # logical shifts: always 0
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
        return jax.random.wrap_key_data(data ^ zero.astype(data.dtype), impl=jax.random.key_impl(key))
    return key ^ zero.astype(key.dtype)


def dropout(rate: float, save_mask: bool = True) -> Layer:
    r"""Inverted dropout with drop probability ``rate``.

    Training (``train=True``, needs ``key=``): draw a keep mask
    m ~ Bernoulli(1 - rate), elementwise, shape of x (N, ...)::

        y = m * x / (1 - rate)                                   (N, ...)
        dX = m * dY / (1 - rate)                                 (N, ...)

    The mask is a constant of the forward pass, so the backward pass is the
    same masked scaling. No parameters (no dW, db). Evaluation
    (``train=False``): y = x, dX = dY. Same key, same mask: runs are
    reproducible.

    Args:
      rate: drop probability, in [0, 1).
      save_mask: what the forward pass keeps for the backward one.
        ``True`` (default): the boolean mask m, one byte per element.
        ``False``: the key only; the backward pass draws m again from it
        (``jax.random.bernoulli`` is a pure function of key and shape, so it
        is the same m bit for bit): no (N, ...) buffer between the passes, at
        the price of generating the random bits twice. Measured on the CPU
        (``experiments/bench/dropout_mask.py``, docs/performance.md): an MLP
        training step's temporaries 11-40% smaller, its time 9-33% longer
        (threefry runs twice); hence the option where memory binds.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    name = f"dropout({rate})" if save_mask else f"dropout({rate}, save_mask=False)"
    keep = 1.0 - rate

    def init(key, in_shape):
        del key
        return tuple(in_shape), ()

    def draw(key, shape):
        return jax.random.bernoulli(key, keep, shape)

    def forward(params, x, *, key=None, train=True):
        del params
        check_float(name, x)
        if not train or rate == 0.0:
            return x, {"mask": jnp.ones((), bool)}
        require_key(name, key)
        mask = draw(key, x.shape)
        y = jnp.where(mask, x / keep, jnp.zeros((), x.dtype))
        if save_mask:
            return y, {"mask": mask}
        return y, {"key": key, "shape": shape_token(x)}

    def backward(cache, dy):
        if "key" in cache:                      # save_mask=False: the same mask, drawn again
            check_same_shape(name, cache["shape"].shape[1:], dy)
            # forward was: mask = draw(key, x.shape)
            mask = draw(_after(cache["key"], dy), dy.shape)
        else:
            mask = cache["mask"]
            if mask.ndim == 0:                  # evaluation / rate 0: identity
                return (), dy
            check_same_shape(name, mask, dy)
        # forward was: y = where(mask, x / keep, 0)
        return (), jnp.where(mask, dy / keep, jnp.zeros((), dy.dtype))

    return Layer(init, forward, backward, name=name, stochastic=True)

"""Inverted dropout."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, check_float, check_same_shape


def dropout(rate: float) -> Layer:
    r"""Inverted dropout with drop probability ``rate``.

    Training (``train=True``, needs ``key=``): draw a keep mask
    m ~ Bernoulli(1 - rate), elementwise, shape of x::

        y = m * x / (1 - rate)          dx = m * dy / (1 - rate)

    The mask is a constant of the forward pass, so the backward pass is the
    same masked scaling (cached as a boolean mask). Evaluation
    (``train=False``): y = x, dx = dy. Shapes: all (N, ...). No parameters.
    Same key, same mask: runs are reproducible.
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout: rate must be in [0, 1), got {rate}")
    name = f"dropout({rate})"
    keep = 1.0 - rate

    def init(key, in_shape):
        del key
        return tuple(in_shape), ()

    def forward(params, x, *, key=None, train=True):
        del params
        check_float(name, x)
        if not train or rate == 0.0:
            return x, {"mask": jnp.ones((), bool)}
        if key is None:
            raise ValueError(f"{name}: training mode needs a PRNG key (forward(..., key=k)); "
                             "pass train=False to evaluate")
        mask = jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(mask, x / keep, jnp.zeros((), x.dtype)), {"mask": mask}

    def backward(cache, dy):
        mask = cache["mask"]
        if mask.ndim == 0:                      # evaluation / rate 0: identity
            return (), dy
        check_same_shape(name, mask, dy)
        return (), jnp.where(mask, dy / keep, jnp.zeros((), dy.dtype))

    return Layer(init, forward, backward, name=name, stochastic=True)

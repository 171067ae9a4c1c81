r"""Data augmentation as a layer: random circular shifts (training only)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Layer, check_float, check_same_shape, require_key, shape_token, token_shape


def random_shift(max_shift: int) -> Layer:
    r"""Roll each example by its own random shift along every spatial axis (wrap-around).

    For x (N, L, C) (or (N, H, W, C), each spatial axis independently), in
    training (``train=True``, needs ``key=``) draw s_n uniform in
    {-max_shift, ..., max_shift} and::

        y[n, l, c] = x[n, (l - s_n) mod L, c]        (jnp.roll of example n by s_n)

    The map is a permutation of positions, so its transpose is its inverse,
    the roll back::

        dx[n, l, c] = dy[n, (l + s_n) mod L, c]

    Evaluation (``train=False``): y = x, dx = dy. It is a stochastic layer
    like dropout (the shifts are the mask), so the training runner's key
    drives it; MNIST-1D's signals are themselves built by wrap-around
    translations. No parameters.
    """
    if not isinstance(max_shift, (int, np.integer)) or max_shift < 0:
        raise ValueError(f"random_shift: max_shift must be a non-negative int, got {max_shift!r}")
    name = f"random_shift({max_shift})"

    def init(key, in_shape):
        del key
        if len(in_shape) < 3:
            raise ValueError(f"{name}: expected in_shape (N, spatial..., C), got {tuple(in_shape)}")
        return tuple(in_shape), ()

    def roll(x, shifts, sign):
        """x[n, (l - sign s_n) mod L] along each spatial axis, as a gather."""
        for a in range(1, x.ndim - 1):
            length = x.shape[a]
            pos = jnp.arange(length).reshape((1,) * a + (length,) + (1,) * (x.ndim - a - 1))
            s = shifts[:, a - 1].reshape((-1,) + (1,) * (x.ndim - 1))
            x = jnp.take_along_axis(x, (pos - sign * s) % length, axis=a)
        return x

    def forward(params, x, *, key=None, train=True):
        del params
        check_float(name, x)
        if np.ndim(x) < 3:
            raise ValueError(f"{name}: expected input of shape (N, spatial..., C), got shape {tuple(np.shape(x))}")
        if not train or max_shift == 0:
            return x, {"shifts": jnp.zeros((0,), jnp.int32), "x_shape": shape_token(x)}
        require_key(name, key)
        shifts = jax.random.randint(key, (x.shape[0], x.ndim - 2), -max_shift, max_shift + 1)
        return roll(x, shifts, 1), {"shifts": shifts, "x_shape": shape_token(x)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["x_shape"]), dy)
        shifts = cache["shifts"]
        if shifts.ndim == 1:                     # evaluation: identity
            return (), dy
        return (), roll(dy, shifts, -1)          # forward was: y = roll(x, s); undo with roll(dy, -s)

    return Layer(init, forward, backward, name=name, stochastic=True)

r"""Learned positional embedding: one trainable vector per position, added to the input."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprop.core import (Layer, check_float, check_input, check_same_shape, default_float, shape_token,
                          token_shape)


def positional_embedding(max_len: int, *, stddev: float = 0.02, dtype=None) -> Layer:
    r"""``y = x + w[:T]``: learned position vectors (GPT-2's ``wpe``).

    Shapes: x, y (N, T, D) with T <= max_len; w (max_len, D).

    Forward::

        y_ntc = x_ntc + w_tc                 t = 0..T-1

    Backward::

        dX = dY                              (N, T, D)
        dW_tc = sum_n dY_ntc  for t < T,  0 for T <= t < max_len        (max_len, D)

    Every example of the batch shares w (fan-out over N: the gradient sums),
    and rows of w beyond the sequence length take no part, so their gradient
    is zero. A sequence longer than ``max_len`` is a ``ValueError`` in forward
    (at trace time: T is static).

    Args:
      max_len: the longest sequence (context length).
      stddev: w starts N(0, stddev^2); 0.02 as GPT-2 (Radford et al. 2019), the
        scale of the token embedding it is added to.
      dtype: parameter dtype (default: float64 under x64, else float32).

    Params: ``{"w": (max_len, D)}``.
    """
    if not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"positional_embedding: max_len must be a positive int, got {max_len!r}")
    name = f"positional_embedding({max_len})"

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{name}: in_shape must be (N, T, D), got {in_shape}")
        if in_shape[1] > max_len:
            raise ValueError(f"{name}: sequence length T={in_shape[1]} exceeds max_len={max_len} "
                             f"(in_shape {in_shape})")
        dt = dtype or default_float()
        return in_shape, {"w": stddev * jax.random.normal(key, (max_len, in_shape[-1]), dt)}

    def forward(params, x):
        w = params["w"]
        check_float(name, x)
        check_input(name, x, ndim=3, what="input (N, T, D)")
        check_input(name, x, last=w.shape[1], dtype=w.dtype)
        t = x.shape[1]
        if t > w.shape[0]:
            raise ValueError(f"{name}: sequence length T={t} exceeds max_len={w.shape[0]} "
                             f"(input shape {tuple(x.shape)})")
        return x + w[None, :t, :], {"w_shape": shape_token(w), "y_shape": shape_token(x)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        n_pos = token_shape(cache["w_shape"])[0]
        t = dy.shape[1]
        # forward was: y = x + w[None, :T]  (rows T.. of w unused)
        dw = jnp.pad(dy.sum(axis=0), ((0, n_pos - t), (0, 0)))
        return {"w": dw}, dy

    return Layer(init, forward, backward, name=name)

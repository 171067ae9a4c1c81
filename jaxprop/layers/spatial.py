r"""Shared helpers of the spatial layers (convolution, pooling): hyperparameter
tuples, padding arithmetic, and wrap-around padding with its backward pass.

Inputs are channels-last, ``(N, L1, ..., Ld, C)`` with d spatial axes.

Padding of one spatial axis of length L, for a window of K taps spread by a
dilation D (effective size E = (K - 1) D + 1) and a stride S:

* ``"VALID"``: (0, 0); the output has floor((L - E) / S) + 1 positions.
* ``"SAME"`` (JAX's meaning): the output has ceil(L / S) positions; the total
  padding P = max((ceil(L / S) - 1) S + E - L, 0) is split lo = floor(P / 2),
  hi = P - lo (the odd one goes at the end), as ``lax.padtype_to_pads``.
* ``"CIRCULAR"``: the amounts of "SAME", filled by wrapping around
  (periodic boundary, as Flax's ``padding="CIRCULAR"``): xp[j] = x[(j - lo) mod L].
* explicit: an int p (every side), or one (lo, hi) pair per spatial axis
  (a bare (lo, hi) pair is accepted when there is one spatial axis).

Wrap-around padding is a gather, ``xp = x[idx]`` with idx_j = (j - lo) mod L;
its backward is the matching scatter-add, which :func:`wrap_pad_backward`
writes densely: every padded position j adds its gradient to position
(j - lo) mod L, so shifting dxp by a = (-lo) mod L positions and cutting it
into consecutive blocks of length L lines every block up with x, and dx is
the sum of the blocks.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

PADDING_MODES = ("SAME", "VALID", "CIRCULAR")


def as_tuple(value, nd: int, what: str, layer: str, *, minimum: int = 1) -> tuple:
    """An int or a length-``nd`` sequence of ints -> a tuple of ``nd`` ints >= minimum."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        out = (int(value),) * nd
    else:
        try:
            out = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{layer}: {what} must be an int or a tuple of {nd} ints, got {value!r}") from None
        if len(out) != nd:
            raise ValueError(f"{layer}: {what} must be an int or a tuple of {nd} int{'s' if nd > 1 else ''} "
                             f"(one per spatial axis), got {value!r}")
    if any(v < minimum for v in out):
        raise ValueError(f"{layer}: {what} must be >= {minimum}, got {value!r}")
    return out


def check_padding_spec(padding, layer: str):
    """Validate ``padding`` at construction time (the rank is not known yet)."""
    if isinstance(padding, str):
        if padding.upper() not in PADDING_MODES:
            raise ValueError(f"{layer}: padding must be one of {PADDING_MODES} or explicit (lo, hi) "
                             f"pairs, got {padding!r}")
        return padding.upper()
    return padding


def resolve_padding(padding, spatial, window, stride, dilation, layer: str):
    """Per-axis ``(lo, hi)`` amounts and whether they wrap around.

    Args:
      padding: a mode string or an explicit spec (see the module docstring).
      spatial, window, stride, dilation: tuples of d ints.
    Returns:
      ``(pads, circular)``: pads a tuple of d (lo, hi) pairs.
    """
    nd = len(spatial)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * nd, False
        pads = []
        for length, k, s, d in zip(spatial, window, stride, dilation):
            eff = (k - 1) * d + 1
            out = -(-length // s)                          # ceil(L / S)
            total = max((out - 1) * s + eff - length, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads), mode == "CIRCULAR"
    if isinstance(padding, (int, np.integer)) and not isinstance(padding, bool):
        pads = ((int(padding), int(padding)),) * nd
    else:
        spec = list(padding)
        if nd == 1 and len(spec) == 2 and all(isinstance(p, (int, np.integer)) for p in spec):
            spec = [tuple(spec)]
        try:
            pads = tuple((int(lo), int(hi)) for lo, hi in spec)
        except (TypeError, ValueError):
            raise ValueError(f"{layer}: explicit padding must be an int or {nd} (lo, hi) pairs, "
                             f"got {padding!r}") from None
        if len(pads) != nd:
            raise ValueError(f"{layer}: explicit padding needs {nd} (lo, hi) pairs (one per spatial "
                             f"axis), got {padding!r}")
    if any(p < 0 for pair in pads for p in pair):
        raise ValueError(f"{layer}: padding amounts must be >= 0, got {padding!r}")
    return pads, False


def out_size(length: int, pad, window: int, stride: int, dilation: int = 1) -> int:
    """floor((L + lo + hi - E) / S) + 1, E = (K - 1) D + 1 (may be <= 0: too small)."""
    eff = (window - 1) * dilation + 1
    return (length + pad[0] + pad[1] - eff) // stride + 1


def wrap_pad(x, pads):
    """Wrap-around padding of the spatial axes 1..d of ``x``: xp[j] = x[(j - lo) mod L]."""
    for axis, (lo, hi) in enumerate(pads, start=1):
        if lo or hi:
            length = x.shape[axis]
            idx = np.arange(-lo, length + hi) % length
            x = jnp.take(x, idx, axis=axis)
    return x


def wrap_pad_backward(dxp, pads, spatial):
    """The transpose of :func:`wrap_pad`: dx[i] = sum of dxp[j] over j with (j - lo) mod L = i."""
    for axis, ((lo, hi), length) in enumerate(zip(pads, spatial), start=1):
        if not (lo or hi):
            continue
        padded = dxp.shape[axis]                              # lo + L + hi
        shift = (-lo) % length                                # original index of j = 0 is `shift`
        blocks = math.ceil((shift + padded) / length)
        widths = [(0, 0)] * dxp.ndim
        widths[axis] = (shift, blocks * length - shift - padded)
        g = jnp.pad(dxp, widths)                              # position j + shift has index (j+shift) mod L
        g = g.reshape(dxp.shape[:axis] + (blocks, length) + dxp.shape[axis + 1:])
        dxp = g.sum(axis=axis)                                # forward was: xp = x[idx]
    return dxp


def strided_view(xp, offset, out_spatial, stride):
    """``xp[:, k1 :: S1][:O1], ...``: the tap at window offset ``offset`` of every output position."""
    start = (0,) + tuple(offset) + (0,)
    limit = (xp.shape[0],) + tuple(k + (o - 1) * s + 1 for k, o, s in zip(offset, out_spatial, stride)) \
        + (xp.shape[-1],)
    return lax.slice(xp, start, limit, (1,) + tuple(stride) + (1,))


def strided_view_backward(g, offset, padded_spatial, stride):
    """The transpose of :func:`strided_view`: put g[o] back at position k + o S, zeros elsewhere
    (``lax.pad`` with S - 1 interior zeros)."""
    config = [(0, 0, 0)]
    for k, o, s, length in zip(offset, g.shape[1:-1], stride, padded_spatial):
        config.append((k, length - k - ((o - 1) * s + 1), s - 1))
    config.append((0, 0, 0))
    return lax.pad(g, jnp.zeros((), g.dtype), config)

r"""Mixed precision: forward and backward in a low precision, master weights in float32.

The recipe (as in mixed-precision training generally): the optimizer keeps
the parameters ("master weights") in float32; each step casts a copy of them
and the input to a compute dtype c (bfloat16 or float16), runs the forward
and the hand-written backward in c, evaluates the loss in float32, and casts
the gradients back to float32 for the update. A cast is the identity in exact
arithmetic, so in the chain rule its backward is the cast of the cotangent
back to the other dtype. With a loss scale S::

    p_c   = cast_c(p)                 x_c = cast_c(x)
    z_c, cache = net.forward(p_c, x_c)            (compute dtype c)
    z     = cast_32(z_c)
    J, lc = loss.forward(z, y)                    (float32: softmax/log stay accurate)
    dz    = loss.backward(lc, S)                  = S dJ/dz
    grads_c, _ = net.backward(cache, cast_c(dz))  (compute dtype c)
    grads = cast_32(grads_c) / S                  = dJ/dp, rounded through c

The middle four lines are the library's one sweep,
``jaxprop.grad.forward_backward(..., dvalue=S, loss_dtype=float32)``; this
module adds only the casts around it. (``cast_floating`` lives in
``jaxprop.core`` and is re-exported here.)

When scaling is needed: bfloat16 has float32's exponent range (8 bits), so
its gradients underflow no sooner than float32's and S = 1 suffices (the
default). float16 has a 5-bit exponent: cotangents below ~6e-8 flush to zero,
so scale the loss (S = 2^10 .. 2^15) and use a *dynamic* scale that halves on
overflow (skipping that step) and doubles after ``period`` finite steps::

    vg = jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.float16)
    ls = jp.dynamic_loss_scale()                     # LossScale(scale=2^15, good_steps=0)

    def step(params, opt_state, ls, x, y):
        value, grads = vg(params, x, y, scale=ls.scale)
        ok = jp.all_finite(grads)
        updates, new_opt = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)     # skip the step on overflow
        params = jax.tree_util.tree_map(keep, new_params, params)
        opt_state = jax.tree_util.tree_map(keep, new_opt, opt_state)
        return params, opt_state, jp.adjust_loss_scale(ls, ok), value

Accuracy: tests/test_precision.py checks the bfloat16 gradients against the
float32 ones and a short bfloat16 training run against float32 training.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, Loss, cast_floating, is_floating, require_state
from jaxprop.grad import forward_backward, next_state

__all__ = ["LossScale", "adjust_loss_scale", "all_finite", "cast_floating", "dynamic_loss_scale",
           "mixed_value_and_grad"]


def mixed_value_and_grad(net: Layer, loss: Loss, *, compute_dtype=jnp.bfloat16, loss_dtype=jnp.float32):
    """Like :func:`jaxprop.value_and_grad`, but forward and backward run in
    ``compute_dtype``; the loss runs in ``loss_dtype``; grads come back in each
    parameter's own dtype (the master weights'). See the module docstring.

    Returns ``f(params, x, y, *, scale=1.0, where=None, **ctx) -> (J, grads)``
    (``((J, new_state), grads)`` for a net with state). ``scale`` is the loss
    scale S (a Python float or a scalar array, e.g. ``LossScale.scale``);
    grads are already divided by it. ``J`` is unscaled. The sweep is
    :func:`jaxprop.grad.forward_backward` with ``dvalue = S`` and
    ``loss_dtype``; ``ctx`` is the forward context, as for ``value_and_grad``.
    """
    if not isinstance(net, Layer) or not isinstance(loss, Loss):
        raise TypeError("mixed_value_and_grad: expected a jaxprop Layer and a jaxprop Loss, got "
                        f"{type(net).__name__} and {type(loss).__name__}")
    compute_dtype, loss_dtype = jnp.dtype(compute_dtype), jnp.dtype(loss_dtype)

    def f(params, x, y, *, scale=1.0, where=None, **ctx):
        state = ctx.get("state")
        require_state(net, state)
        p_c = cast_floating(params, compute_dtype)                          # p_c = cast_c(p)
        s_c = cast_floating(state, compute_dtype) if state is not None else None
        if state is not None:
            ctx = dict(ctx, state=s_c)
        s = jnp.asarray(scale, loss_dtype)
        sweep = forward_backward(net, loss, p_c, cast_floating(x, compute_dtype), y, dvalue=s,  # S dJ/dz
                                 loss_dtype=loss_dtype, where=where, **ctx)
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype) / s.astype(p.dtype), sweep.grads, params)
        if net.stateful:
            new_state = next_state(net, s_c, sweep.cache, train=ctx.get("train", True))
            new_state = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_state, state)
            return (sweep.value, new_state), grads
        return sweep.value, grads

    return f


class LossScale(NamedTuple):
    """Dynamic loss-scale state (never touched by the optimizer).

    Attributes:
      scale: float32 scalar S.
      good_steps: int32 scalar, finite steps since the last change.
    """

    scale: jax.Array
    good_steps: jax.Array


def dynamic_loss_scale(initial: float = 2.0 ** 15) -> LossScale:
    """The initial :class:`LossScale`: ``scale=initial``, ``good_steps=0``."""
    return LossScale(jnp.asarray(initial, jnp.float32), jnp.zeros((), jnp.int32))


def all_finite(tree) -> jax.Array:
    """A boolean scalar: every element of every floating leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree) if is_floating(a)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def adjust_loss_scale(ls: LossScale, finite, *, period: int = 2000, factor: float = 2.0,
                      min_scale: float = 1.0, max_scale: float = 2.0 ** 24) -> LossScale:
    """Next loss scale: on a non-finite step S <- max(S / factor, min_scale) and
    the counter resets; after ``period`` consecutive finite steps
    S <- min(S * factor, max_scale)."""
    finite = jnp.asarray(finite)
    grow = finite & (ls.good_steps + 1 >= period)
    scale = jnp.where(finite, jnp.where(grow, jnp.minimum(ls.scale * factor, max_scale), ls.scale),
                      jnp.maximum(ls.scale / factor, min_scale))
    good = jnp.where(finite & ~grow, ls.good_steps + 1, jnp.zeros((), jnp.int32))
    return LossScale(scale.astype(jnp.float32), good.astype(jnp.int32))

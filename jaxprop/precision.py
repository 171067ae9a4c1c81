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

from jaxprop.core import Layer, Loss, call_forward


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.floating)


def cast_floating(tree, dtype):
    """Cast every floating-point leaf of ``tree`` to ``dtype`` (integer leaves,
    e.g. labels, are left alone)."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if _is_float(a) else a, tree)


def mixed_value_and_grad(net: Layer, loss: Loss, *, compute_dtype=jnp.bfloat16, loss_dtype=jnp.float32):
    """Like :func:`jaxprop.value_and_grad`, but forward and backward run in
    ``compute_dtype``; the loss runs in ``loss_dtype``; grads come back in each
    parameter's own dtype (the master weights'). See the module docstring.

    Returns ``f(params, x, y, *, scale=1.0, key=None, train=True, state=None)
    -> (J, grads)`` (``((J, new_state), grads)`` for a net with state). ``scale``
    is the loss scale S (a Python float or a scalar array, e.g.
    ``LossScale.scale``); grads are already divided by it. ``J`` is unscaled.
    """
    if not isinstance(net, Layer) or not isinstance(loss, Loss):
        raise TypeError("mixed_value_and_grad: expected a jaxprop Layer and a jaxprop Loss, got "
                        f"{type(net).__name__} and {type(loss).__name__}")
    compute_dtype, loss_dtype = jnp.dtype(compute_dtype), jnp.dtype(loss_dtype)

    def f(params, x, y, *, scale=1.0, key=None, train=True, state=None):
        if net.stateful and state is None:
            raise ValueError(f"{net.name}: this network has state; pass state=jp.init_state(net, in_shape)")
        p_c = cast_floating(params, compute_dtype)                          # p_c = cast_c(p)
        s_c = cast_floating(state, compute_dtype) if state is not None else None
        z_c, cache = call_forward(net, p_c, cast_floating(x, compute_dtype), key=key, train=train, state=s_c)
        value, loss_cache = loss.forward(z_c.astype(loss_dtype), y)         # z = cast_32(z_c)
        s = jnp.asarray(scale, loss_dtype)
        dz = loss.backward(loss_cache, s)                                   # S dJ/dz
        grads_c, _ = net.backward(cache, dz.astype(compute_dtype))          # backward of the cast
        grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype) / s.astype(p.dtype), grads_c, params)
        if net.stateful:
            new_state = net.update_state(s_c, cache) if train else s_c
            new_state = jax.tree_util.tree_map(lambda a, b: a.astype(b.dtype), new_state, state)
            return (value, new_state), grads
        return value, grads

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
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree) if _is_float(a)]
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

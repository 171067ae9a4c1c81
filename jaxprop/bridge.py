"""The custom_vjp bridge: a jaxprop layer or loss as an ordinary JAX function
whose VJP is the hand-written backward pass.

Use it to put a hand-differentiated layer inside code that ``jax.grad``
differentiates, or to check a backward with ``jax.test_util.check_vjp``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprop.core import Layer, Loss, call_forward, call_loss


def as_custom_vjp(obj, **ctx):
    """Wrap a :class:`Layer` as ``f(params, x) -> y`` or a :class:`Loss` as
    ``f(pred, target) -> J``, with ``jax.custom_vjp`` rules
    ``fwd = forward`` and ``bwd = backward``.

    For a layer, ``ctx`` is the forward context, fixed for the wrapped
    function (``key=`` for dropout's mask, ``train=``/``state=`` for batch
    norm's mode, or any keyword a layer declares, through
    :func:`jaxprop.call_forward`); the new state of a stateful layer is not
    returned (use ``jp.call_forward`` for that). A non-float input (token
    ids) gets no cotangent (the backward's ``dx = None``).
    For a loss, ``ctx`` holds the loss's keywords (e.g. ``where=``); integer
    labels get no cotangent; float targets get the loss's hand-written
    ``backward_target``.
    """
    if isinstance(obj, Layer):
        return _layer_vjp(obj, ctx)
    if isinstance(obj, Loss):
        return _loss_vjp(obj, ctx)
    raise TypeError(f"as_custom_vjp: expected a jaxprop Layer or Loss, got {type(obj).__name__}")


def _layer_vjp(layer, ctx):
    @jax.custom_vjp
    def f(params, x):
        return call_forward(layer, params, x, **ctx)[0]

    def fwd(params, x):
        return call_forward(layer, params, x, **ctx)

    def bwd(cache, dy):
        return layer.backward(cache, dy)

    f.defvjp(fwd, bwd)
    return f


def _loss_vjp(loss, kw):
    @jax.custom_vjp
    def f(pred, target):
        return call_loss(loss, pred, target, **kw)[0]

    def fwd(pred, target):
        value, cache = call_loss(loss, pred, target, **kw)
        return value, (cache, jnp.zeros((0,), jnp.result_type(target)))   # token: target's dtype

    def bwd(res, dvalue):
        cache, token = res
        dpred = loss.backward(cache, dvalue)
        if jnp.issubdtype(token.dtype, jnp.floating) and loss.backward_target is not None:
            return dpred, loss.backward_target(cache, dvalue)
        return dpred, None

    f.defvjp(fwd, bwd)
    return f

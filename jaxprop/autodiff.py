"""The autodiff reference: ``jax.value_and_grad`` of the same forward pass.

``value_and_grad(net, loss)`` has exactly the signature and return values of
:func:`jaxprop.value_and_grad` but differentiates ``loss.forward(net.forward(...))``
with JAX's autodiff instead of the hand-written backward passes. Training
with ``--grad autodiff`` uses it, so a hand-written run and its reference
differ in the gradient path only. This module is verification code: the
library's gradient path never imports it.
"""
from __future__ import annotations

import jax

from jaxprop.core import Layer, Loss, call_forward, call_loss, require_state
from jaxprop.grad import next_state


def value_and_grad(net: Layer, loss: Loss):
    """``f(params, x, y, *, where=None, **ctx)`` -> ``(J, grads)``, or
    ``((J, new_state), grads)`` for a net with state, by ``jax.value_and_grad``.
    ``ctx`` is the forward context (``key=``, ``train=``, ``state=``, ...);
    ``where=`` goes to the loss."""
    if not isinstance(net, Layer) or not isinstance(loss, Loss):
        raise TypeError("autodiff.value_and_grad: expected a jaxprop Layer and Loss, got "
                        f"{type(net).__name__} and {type(loss).__name__}")

    def f(params, x, y, *, where=None, **ctx):
        require_state(net, ctx.get("state"))

        def cost(p):
            pred, cache = call_forward(net, p, x, **ctx)
            value, _ = call_loss(loss, pred, y, where=where)
            if net.stateful:
                return value, next_state(net, ctx["state"], cache, train=ctx.get("train", True))
            return value

        return jax.value_and_grad(cost, has_aux=net.stateful)(params)

    return f

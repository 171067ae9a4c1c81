"""Gradients of a network's cost, by the hand-written reverse sweep.

``value_and_grad(net, loss)`` has the call shape of
``jax.value_and_grad(cost)`` with ``cost(params, x, y)``, so a training step
takes either one and the two differ by one argument.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxprop.core import Layer, Loss, call_forward


def _check(net, loss):
    if not isinstance(net, Layer):
        raise TypeError(f"value_and_grad: net must be a jaxprop Layer, got {type(net).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"value_and_grad: loss must be a jaxprop Loss, got {type(loss).__name__} "
                        "(did you forget the call, e.g. jp.mse()?)")


def value_and_grad(net: Layer, loss: Loss):
    """Return ``f(params, x, y, *, key=None, train=True, state=None)``.

    ``f`` runs ``net.forward`` then ``loss.forward`` (J), then the backward
    sweep: ``dpred = loss.backward(cache, 1)`` and
    ``grads, _ = net.backward(cache, dpred)``.

    Returns ``(J, grads)``, grads with exactly the pytree structure of params.
    For a net with state (batch norm) it returns ``((J, new_state), grads)``,
    like ``jax.value_and_grad(..., has_aux=True)``; ``state=`` is required.
    ``key=`` feeds stochastic layers (dropout); ``train=False`` evaluates.
    """
    _check(net, loss)

    def f(params, x, y, *, key=None, train=True, state=None):
        if net.stateful and state is None:
            raise ValueError(f"{net.name}: this network has state (e.g. batch norm); pass "
                             "state=jp.init_state(net, in_shape) and read ((value, state), grads)")
        pred, cache = call_forward(net, params, x, key=key, train=train, state=state)
        value, loss_cache = loss.forward(pred, y)
        dpred = loss.backward(loss_cache, jnp.ones((), value.dtype))
        grads, _ = net.backward(cache, dpred)
        if net.stateful:
            new_state = net.update_state(state, cache) if train else state
            return (value, new_state), grads
        return value, grads

    return f


def grad(net: Layer, loss: Loss):
    """Like :func:`value_and_grad` but returns only the gradients
    (``(grads, new_state)`` for a net with state)."""
    vg = value_and_grad(net, loss)

    def f(params, x, y, **kwargs):
        value, grads = vg(params, x, y, **kwargs)
        if net.stateful:
            return grads, value[1]
        return grads

    return f

r"""Gradients of a network's cost, by the hand-written reverse sweep -- written once.

:func:`forward_backward` is the one sweep of the whole library::

    pred, cache   = net.forward(params, x, **ctx)        (call_forward: the open context)
    J, lcache     = loss.forward(pred, y[, where=where])  (pred cast to loss_dtype if given)
    dpred         = loss.backward(lcache, dvalue)         (cast back to pred's dtype)
    grads, dx     = net.backward(cache, dpred)            (the reverse sweep)

and checks, at trace time (free under ``jit``), that ``grads`` has the
structure, shapes and dtypes of ``params`` and ``dx`` those of a float ``x``
(a user layer's wrong-shaped gradient would otherwise go straight into
optax). Everything that needs gradients calls it: :func:`value_and_grad`
and :func:`grad` here, :func:`jaxprop.mixed_value_and_grad` (casts around
it, ``dvalue`` = the loss scale), :func:`jaxprop.check_gradients` (so what is
checked is what trains), the training step and the data-parallel step.

``value_and_grad(net, loss)`` has the call shape of
``jax.value_and_grad(cost)`` with ``cost(params, x, y)``, so a training step
takes either one and the two differ by one argument.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp

from jaxprop.core import Layer, Loss, call_forward, call_loss, check_dx, check_grads, require_state


class Sweep(NamedTuple):
    """What one forward-backward sweep computes.

    Attributes:
      value: the loss J (a scalar, in the loss's dtype).
      grads: dJ/dparams (times ``dvalue``), the pytree of ``params``.
      dx: dJ/dx, or ``None`` for a non-float input (token ids).
      pred: the network's output.
      cache: the network's forward cache (for ``update_state``).
    """

    value: Any
    grads: Any
    dx: Any
    pred: Any
    cache: Any


def _check(net, loss, who="value_and_grad"):
    if not isinstance(net, Layer):
        raise TypeError(f"{who}: net must be a jaxprop Layer, got {type(net).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"{who}: loss must be a jaxprop Loss, got {type(loss).__name__} "
                        "(did you forget the call, e.g. jp.mse()?)")


def forward_backward(net: Layer, loss: Loss, params, x, y, *, dvalue=1.0, loss_dtype=None,
                     where=None, **ctx) -> Sweep:
    """One forward pass, the loss, and the reverse sweep (see the module docstring).

    Args:
      net, loss: a jaxprop Layer and Loss.
      params, x, y: the network's parameters, its input and the loss's target.
      dvalue: the cotangent of J (1 for dJ; the loss scale S gives S dJ).
      loss_dtype: evaluate the loss in this dtype (mixed precision), the
        backward of that cast casting ``dpred`` back to ``pred``'s dtype.
      where: passed to ``loss.forward`` when not None (positions that count).
      **ctx: the forward context (``key=``, ``train=``, ``state=``, ...).

    Returns:
      A :class:`Sweep` ``(value, grads, dx, pred, cache)``. Raises
      ``ValueError`` naming ``net`` when its backward returns grads that do
      not match ``params`` or a dx that does not match a float ``x``.
    """
    value, dpred, pred, cache = forward_loss(net, loss, params, x, y, dvalue=dvalue, loss_dtype=loss_dtype,
                                             where=where, **ctx)
    grads, dx = net.backward(cache, dpred)
    check_grads(net.name, grads, params)
    check_dx(net.name, dx, x)
    return Sweep(value, grads, dx, pred, cache)


def forward_loss(net: Layer, loss: Loss, params, x, y, *, dvalue=1.0, loss_dtype=None, where=None, **ctx):
    """The sweep up to the network's backward: ``(value, dpred, pred, cache)``
    (the first three lines of the module docstring; arguments as
    :func:`forward_backward`, which calls it). For callers that run their own
    backward from ``dpred`` (:mod:`jaxprop.per_example`: per-example rules,
    a reweighted ``dpred``)."""
    pred, cache = call_forward(net, params, x, **ctx)
    z = pred if loss_dtype is None else pred.astype(loss_dtype)
    value, lcache = call_loss(loss, z, y, where=where)
    dpred = loss.backward(lcache, jnp.asarray(dvalue, value.dtype))
    if dpred.dtype != pred.dtype:
        dpred = dpred.astype(pred.dtype)                # backward of the cast to loss_dtype
    return value, dpred, pred, cache


def next_state(net: Layer, state, cache, *, train=True):
    """The state after a forward pass: ``net.update_state`` in training, unchanged in evaluation."""
    return net.update_state(state, cache) if train else state


def value_and_grad(net: Layer, loss: Loss):
    """Return ``f(params, x, y, *, where=None, **ctx)``.

    ``f`` runs :func:`forward_backward`: ``net.forward`` then ``loss.forward``
    (J), then ``dpred = loss.backward(cache, 1)`` and
    ``grads, _ = net.backward(cache, dpred)``.

    Returns ``(J, grads)``, grads with exactly the pytree structure of params.
    For a net with state (batch norm) it returns ``((J, new_state), grads)``,
    like ``jax.value_and_grad(..., has_aux=True)``; ``state=`` is required.
    ``ctx`` is the forward context: ``key=`` feeds stochastic layers
    (dropout), ``train=False`` evaluates, any other keyword reaches the
    layers that declare it; ``where=`` goes to the loss.
    """
    _check(net, loss)

    def f(params, x, y, *, where=None, **ctx):
        require_state(net, ctx.get("state"))
        sweep = forward_backward(net, loss, params, x, y, where=where, **ctx)
        if net.stateful:
            new_state = next_state(net, ctx["state"], sweep.cache, train=ctx.get("train", True))
            return (sweep.value, new_state), sweep.grads
        return sweep.value, sweep.grads

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

"""The training step: gradients, ``tx.update``, ``optax.apply_updates`` -- one jitted function.

The step takes any gradient function with the call shape of
``jax.value_and_grad(cost)`` (``jp.value_and_grad(net, loss)``, or
``jaxprop.autodiff.value_and_grad(net, loss)`` for the autodiff reference),
so a hand-written run and an autodiff run differ by one argument; the
package docstring of :mod:`jaxprop.train` shows the three call forms (plain,
dropout, batch norm). This is the one step of jaxprop:
:func:`jaxprop.train.fit` and :func:`jaxprop.distributed.data_parallel_step`
both compile it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import jax
import optax

from jaxprop.core import Layer, Loss, needs_key
from jaxprop.grad import value_and_grad as hand_value_and_grad


def grad_function(net: Layer, loss: Loss, kind: Union[str, Callable] = "hand"):
    """``"hand"``: :func:`jaxprop.value_and_grad` (the hand-written backward);
    ``"autodiff"``: :func:`jaxprop.autodiff.value_and_grad` (``jax.value_and_grad``
    of the same forward); or a callable ``(net, loss) -> grad_fn``."""
    if callable(kind):
        return kind(net, loss)
    if kind == "hand":
        return hand_value_and_grad(net, loss)
    if kind == "autodiff":
        from jaxprop import autodiff          # the reference path, imported only on request
        return autodiff.value_and_grad(net, loss)
    raise ValueError(f"grad must be 'hand', 'autodiff' or a function (net, loss) -> grad_fn; got {kind!r}")


def step_kind(net: Optional[Layer] = None, stateful: Optional[bool] = None,
              stochastic: Optional[bool] = None) -> Tuple[bool, bool]:
    """``(stateful, stochastic)`` of a step: each one given, or the net's
    (``net.stateful``; :func:`jaxprop.core.needs_key`), or False without a net."""
    if stateful is None:
        stateful = net is not None and net.stateful
    if stochastic is None:
        stochastic = net is not None and needs_key(net)
    return bool(stateful), bool(stochastic)


def check_step_args(where: str, stateful: bool, stochastic: bool, key, state) -> None:
    """The ValueError a step raises when a stochastic net gets no ``key=`` or
    a net with state gets no ``state=``."""
    if stochastic and key is None:
        raise ValueError(f"{where}: the network is stochastic (e.g. dropout); pass key=")
    if stateful and state is None:
        raise ValueError(f"{where}: the network has state (e.g. batch norm); pass state=")


def make_train_step(grad_fn, tx: optax.GradientTransformation, *, net: Optional[Layer] = None,
                    stateful: Optional[bool] = None, stochastic: Optional[bool] = None,
                    donate: bool = True, jit: bool = True):
    """One optimisation step: gradients, ``tx.update``, ``optax.apply_updates``.

    Args:
      grad_fn: ``(params, x, y, **kw) -> (value, grads)`` -- e.g.
        ``jp.value_and_grad(net, loss)``, ``jaxprop.autodiff.value_and_grad(net, loss)``
        or ``jax.value_and_grad(cost)``. For a stateful net it returns
        ``((value, new_state), grads)`` and takes ``state=``.
      tx: an optax GradientTransformation.
      net: optional; when given, ``stateful``/``stochastic`` default to the net's.
      stateful: pass ``state=`` to grad_fn and return the new state.
      stochastic: pass ``key=`` to grad_fn (dropout).
      donate: donate the old params / optimizer state / model state buffers
        to the update (the caller must not reuse the arrays it passed in).
      jit: return the step jitted (default) or as a plain function (to
        compose inside another jitted function).

    Returns:
      ``step(params, opt_state, x, y, key=None, state=None)`` returning
      ``(params, opt_state, value)``, or ``(params, opt_state, (value, state))``
      for a stateful net -- the same convention as ``jp.value_and_grad``.
    """
    stateful, stochastic = step_kind(net, stateful, stochastic)

    def step(params, opt_state, x, y, key=None, state=None):
        check_step_args("train step", stateful, stochastic, key, state)
        kwargs = {"key": key} if stochastic else {}
        if stateful:
            (value, state), grads = grad_fn(params, x, y, state=state, **kwargs)
        else:
            value, grads = grad_fn(params, x, y, **kwargs)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ((value, state) if stateful else value)

    if not jit:
        return step
    names = ("params", "opt_state") + (("state",) if stateful else ()) if donate else ()
    return jax.jit(step, donate_argnames=names)

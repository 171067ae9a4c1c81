"""Combinators: layers made of layers, each itself a layer.

* :func:`serial` -- layers in order; its backward is the reverse sweep (backprop).
* :func:`residual` -- ``x + block(x)``; the two paths' gradients sum.
* :func:`repeat` -- n shape-keeping blocks as one ``lax.scan`` (and a reverse
  scan), with :func:`stack_params` / :func:`unstack_params` for its layout.

Every combinator's forward is ``forward(params, x, **ctx)``: it splits
``key`` per child, hands each child its ``state``, and passes every other
context keyword on (see :mod:`jaxprop.core`).
"""
from jaxprop.combinators.repeat import repeat, stack_params, unstack_params
from jaxprop.combinators.residual import residual
from jaxprop.combinators.serial import serial

__all__ = ["repeat", "residual", "serial", "stack_params", "unstack_params"]

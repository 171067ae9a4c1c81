"""Combinators: layers made of layers, each itself a layer.

* :func:`serial` -- layers in order; its backward is the reverse sweep (backprop).
* :func:`residual` -- ``x + block(x)``; the two paths' gradients sum.
* :func:`repeat` -- n shape-keeping blocks as one ``lax.scan`` (and a reverse
  scan), with :func:`stack_params` / :func:`unstack_params` for its layout.
* :func:`remat` -- caches only a layer's input; its backward re-runs the
  forward first (recomputation instead of storage).
* :func:`tied` -- one weight used by two layers; its gradient is the sum
  over both uses (fan-out, as in ``residual``).
* :func:`scan` -- a recurrent :class:`Cell` over time: forward ``lax.scan``,
  backward the hand-written reverse scan (backprop through time).

Every combinator's forward is ``forward(params, x, **ctx)``: it splits
``key`` per child, hands each child its ``state``, and passes every other
context keyword on (see :mod:`jaxprop.core`).
"""
from jaxprop.combinators.remat import remat
from jaxprop.combinators.repeat import repeat, stack_params, unstack_params
from jaxprop.combinators.residual import residual
from jaxprop.combinators.scan import Cell, scan
from jaxprop.combinators.serial import serial
from jaxprop.combinators.tied import tied

__all__ = ["Cell", "remat", "repeat", "residual", "scan", "serial", "stack_params", "tied", "unstack_params"]

"""The layer and loss records, and the few helpers every layer shares.

Notation used in every docstring of jaxprop: for a cost J and any array ``a``
of the computation, ``da`` is dJ/da, an array of the same shape as ``a``
(autodidax calls it the cotangent ``a_bar``). A backward pass receives ``dy``
and returns the gradients of its parameters and ``dx``.

The layer protocol (see DESIGN.md, section 1)::

    out_shape, params = layer.init(key, in_shape)    # in_shape includes the batch axis
    y, cache          = layer.forward(params, x)     # cache: arrays backward needs
    grads, dx         = layer.backward(cache, dy)    # grads: same pytree as params

Two optional capabilities, declared on the record, keep simple layers simple:

* ``stochastic=True`` (dropout): ``forward`` also takes ``key=`` and ``train=``.
* ``init_state`` / ``update_state`` (batch norm): ``forward`` also takes
  ``state=`` and ``train=``; ``init_state(in_shape)`` builds the state (running
  statistics) that the optimizer never touches, and
  ``update_state(state, cache)`` returns the next state after a training
  forward pass. Stateless layers have state ``()``.

:func:`call_forward` passes each layer exactly the keywords it declares, so a
user's own ``jp.Layer(init, forward, backward)`` needs nothing more.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Shape = tuple
PyTree = Any


class Layer(NamedTuple):
    """A layer: three pure functions and two optional capabilities.

    Attributes:
      init: ``(key, in_shape) -> (out_shape, params)``.
      forward: ``(params, x, **ctx) -> (y, cache)``; ``cache`` is a pytree of
        arrays only, so it can cross a ``jax.jit`` boundary.
      backward: ``(cache, dy) -> (grads, dx)``; ``grads`` has the structure
        of ``params`` (``()`` for a layer without parameters).
      name: used in error messages and gradient reports.
      init_state: ``in_shape -> state`` for layers with non-trainable state
        (running statistics); ``None`` for stateless layers.
      update_state: ``(state, cache) -> state`` after a training forward pass.
      stochastic: ``forward`` takes ``key=`` and ``train=`` (dropout).
    """

    init: Callable
    forward: Callable
    backward: Callable
    name: str = "layer"
    init_state: Optional[Callable] = None
    update_state: Optional[Callable] = None
    stochastic: bool = False

    @property
    def stateful(self) -> bool:
        return self.init_state is not None


class Loss(NamedTuple):
    """A loss: ``J = forward(pred, target)``, mean over the batch axis.

    Attributes:
      forward: ``(pred, target) -> (value, cache)``; ``value`` is a scalar.
      backward: ``(cache, dvalue=1.0) -> dpred`` with ``dpred`` = dJ/dpred.
      name: used in error messages and reports.
      backward_target: optional ``(cache, dvalue) -> dtarget`` for float
        targets (used by the custom_vjp bridge); ``None`` when the target is
        integer labels or its gradient is not defined.
    """

    forward: Callable
    backward: Callable
    name: str = "loss"
    backward_target: Optional[Callable] = None


def call_forward(layer: Layer, params, x, *, key=None, train: bool = True, state=None):
    """Run ``layer.forward`` passing only the keywords the layer declares."""
    kwargs = {}
    if layer.stochastic:
        kwargs.update(key=key, train=train)
    if layer.stateful:
        kwargs.update(state=state, train=train)
    return layer.forward(params, x, **kwargs)


def init_state(layer: Layer, in_shape) -> PyTree:
    """The layer's initial non-trainable state (``()`` for stateless layers)."""
    return layer.init_state(tuple(in_shape)) if layer.stateful else ()


def output_shape(layer: Layer, in_shape) -> Shape:
    """The output shape of ``layer`` for ``in_shape``, without allocating params."""
    box = []

    def run(key):
        out_shape, params = layer.init(key, tuple(in_shape))
        box.append(tuple(out_shape))
        return params

    jax.eval_shape(run, jax.random.key(0))
    return box[0]


def default_float():
    """float64 when ``jax_enable_x64`` is on, else float32."""
    return jnp.zeros(()).dtype


def check_input(name: str, x, *, ndim=None, min_ndim=None, last=None, dtype=None,
                what: str = "input"):
    """Raise a ``ValueError`` naming the layer and both shapes/dtypes.

    Runs at trace time on static shapes, so it costs nothing under ``jit``.
    """
    shape = tuple(np.shape(x))
    if ndim is not None and len(shape) != ndim:
        raise ValueError(f"{name}: expected a rank-{ndim} {what}, got shape {shape} (rank {len(shape)})")
    if min_ndim is not None and len(shape) < min_ndim:
        raise ValueError(f"{name}: expected a {what} of rank >= {min_ndim}, got shape {shape}")
    if last is not None and (not shape or shape[-1] != last):
        raise ValueError(f"{name}: expected {what} with {last} features on the last axis, "
                         f"got shape {shape}")
    if dtype is not None and jnp.result_type(x) != jnp.dtype(dtype):
        raise ValueError(f"{name}: expected {what} of dtype {jnp.dtype(dtype)}, "
                         f"got {jnp.result_type(x)} (cast the input or the parameters explicitly)")


def check_same_shape(name: str, expected, got, what: str = "dy"):
    """``expected``: a shape tuple, or an array whose shape ``got`` must have."""
    exp = tuple(expected) if isinstance(expected, (tuple, list)) else tuple(np.shape(expected))
    if tuple(np.shape(got)) != exp:
        raise ValueError(f"{name}: expected {what} of shape {exp}, got {tuple(np.shape(got))}")


def check_float(name: str, x, what: str = "input"):
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name}: expected a floating-point {what}, got dtype {jnp.result_type(x)}")


def is_concrete(x) -> bool:
    """True when ``x`` holds values now (not a tracer inside jit/grad)."""
    return not isinstance(x, jax.core.Tracer)


def shape_token(x) -> Array:
    """A zero-size array whose shape records ``x``'s shape: ``(0, *x.shape)``.

    Caches hold arrays only (so they cross ``jit``), yet some backward passes
    need a static shape (flatten, or checking ``dy``). This costs no memory.
    """
    return jnp.zeros((0,) + tuple(x.shape), x.dtype)


def token_shape(token) -> Shape:
    return tuple(token.shape[1:])

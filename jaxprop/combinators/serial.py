r"""``serial``: layers applied in order. Composition is the dynamic programme.

``serial`` is backprop itself. For J(f_L(... f_1(x))) with x_k = f_k(x_{k-1}),
the chain rule over every path from a weight of layer k to J factors as::

    dJ/dW_k = dJ/dx_k . dx_k/dW_k,   dJ/dx_{k-1} = dJ/dx_k . dx_k/dx_{k-1}

so ``dx_k`` (computed once, by layer k+1's backward) is reused by every
weight of layer k. Walking the layers in reverse and handing each layer's
``dx`` to the layer before it costs one backward per layer -- linear in the
network -- where expanding the sum over all input-to-output paths costs a
number of terms exponential in depth.
"""
from __future__ import annotations

import jax

from jaxprop.core import Layer, call_forward, call_per_example, call_per_example_norms, output_shape


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def serial(*layers: Layer) -> Layer:
    """Layers applied in order: ``y = f_L(...f_2(f_1(x)))``.

    Params, grads, caches and states are tuples with one entry per layer.
    Forward collects every layer's cache; backward is the reverse sweep::

        for k = L..1:  grads_k, dy = layer_k.backward(cache_k, dy)

    The forward context is open (``forward(params, x, **ctx)``): ``key=`` is
    split into one key per layer, ``state=`` is a tuple of per-layer states
    (``()`` for stateless ones), every other keyword reaches every layer
    that declares it. Only the first layer may return ``dx = None`` (a
    non-float input such as token ids); from a later layer it is an error.

    Per example (:mod:`jaxprop.per_example`) the sweep is the same with each
    layer's per-example rule (:func:`jaxprop.core.call_per_example`): the
    per-example gradients are a tuple per layer, and the squared per-example
    norms add over the layers.
    """
    if not layers:
        raise ValueError("serial: needs at least one layer")
    for i, layer in enumerate(layers):
        if not isinstance(layer, Layer):
            raise TypeError(f"serial: argument {i} is {type(layer).__name__}, not a jaxprop Layer "
                            "(did you forget the call, e.g. jp.relu() instead of jp.relu?)")
    name = "serial(" + ", ".join(layer.name for layer in layers) + ")"
    stochastic = any(layer.stochastic for layer in layers)
    stateful = any(layer.stateful for layer in layers)

    def init(key, in_shape):
        params, shape = [], tuple(in_shape)
        for layer, k in zip(layers, jax.random.split(key, len(layers))):
            shape, p = layer.init(k, shape)
            params.append(p)
        return tuple(shape), tuple(params)

    def forward(params, x, **ctx):
        if len(params) != len(layers):
            raise ValueError(f"{name}: expected params for {len(layers)} layers, got {len(params)}")
        keys = _split(ctx.get("key"), len(layers))
        states = ctx.get("state") if stateful else None
        if states is not None and len(states) != len(layers):
            raise ValueError(f"{name}: expected a state for each of {len(layers)} layers, got {len(states)}")
        caches = []
        for i, (layer, p) in enumerate(zip(layers, params)):
            child = dict(ctx)                           # every keyword passes on ...
            if keys[i] is not None:
                child["key"] = keys[i]                  # ... a key of its own per layer
            if states is not None:
                child["state"] = states[i]              # ... and its own state
            x, cache = call_forward(layer, p, x, **child)
            caches.append(cache)
        return x, tuple(caches)

    def check_dx(i, dy):
        if dy is None and i > 0:
            raise ValueError(
                f"{name}: layer {i} ({layers[i].name}) returned dx=None, but its input is the output "
                f"of layer {i - 1} ({layers[i - 1].name}), which needs a gradient; only the first "
                "layer may return dx=None (a non-float input, e.g. token ids)")

    def backward(cache, dy):
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):          # the reverse sweep
            grads[i], dy = layers[i].backward(cache[i], dy)
            check_dx(i, dy)
        return tuple(grads), dy

    def per_example(cache, dy):                         # the same sweep, each layer's per-example rule
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):
            grads[i], dy = call_per_example(layers[i], cache[i], dy)
            check_dx(i, dy)
        return tuple(grads), dy

    def per_example_norms(cache, dy):                   # squared norms add over the layers' parameters
        sq = 0
        for i in reversed(range(len(layers))):
            sq_i, dy = call_per_example_norms(layers[i], cache[i], dy)
            check_dx(i, dy)
            sq = sq + sq_i
        return sq, dy

    def init_state(in_shape):
        states, shape = [], tuple(in_shape)
        for layer in layers:
            states.append(layer.init_state(shape) if layer.stateful else ())
            shape = output_shape(layer, shape)
        return tuple(states)

    def update_state(state, cache):
        return tuple(layer.update_state(s, c) if layer.stateful else s
                     for layer, s, c in zip(layers, state, cache))

    return Layer(init, forward, backward, name=name,
                 init_state=init_state if stateful else None,
                 update_state=update_state if stateful else None,
                 stochastic=stochastic, per_example=per_example, per_example_norms=per_example_norms)

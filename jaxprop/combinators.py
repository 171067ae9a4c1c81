r"""Combinators: layers made of layers. Composition is the dynamic programme.

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

from jaxprop.core import Layer, call_forward, check_same_shape, output_shape, shape_token, token_shape


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


def serial(*layers: Layer) -> Layer:
    """Layers applied in order: ``y = f_L(...f_2(f_1(x)))``.

    Params, grads, caches and states are tuples with one entry per layer.
    Forward collects every layer's cache; backward is the reverse sweep::

        for k = L..1:  grads_k, dy = layer_k.backward(cache_k, dy)

    ``key=`` is split into one key per layer (only stochastic layers use it);
    ``state=`` is a tuple of per-layer states (``()`` for stateless ones).
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

    def forward(params, x, *, key=None, train=True, state=None):
        if len(params) != len(layers):
            raise ValueError(f"{name}: expected params for {len(layers)} layers, got {len(params)}")
        states = state if state is not None else (None,) * len(layers)
        caches = []
        for layer, p, k, s in zip(layers, params, _split(key, len(layers)), states):
            x, cache = call_forward(layer, p, x, key=k, train=train, state=s)
            caches.append(cache)
        return x, tuple(caches)

    def backward(cache, dy):
        grads = [None] * len(layers)
        for i in reversed(range(len(layers))):          # the reverse sweep
            grads[i], dy = layers[i].backward(cache[i], dy)
        return tuple(grads), dy

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
                 stochastic=stochastic)


def residual(block: Layer) -> Layer:
    """Skip connection ``y = x + block(x)`` (block must keep the shape).

    x fans out to two paths (identity and block), so its gradient is the sum
    over both paths::

        dx = dy + dx_block,   dx_block from block.backward(cache, dy)
        grads = grads of block (the identity path has no parameters)
    """
    name = f"residual({block.name})"

    def init(key, in_shape):
        out_shape, params = block.init(key, in_shape)
        if tuple(out_shape) != tuple(in_shape):
            raise ValueError(f"{name}: block must keep the shape; in {tuple(in_shape)}, out {tuple(out_shape)}")
        return tuple(in_shape), params

    def forward(params, x, *, key=None, train=True, state=None):
        h, cache = call_forward(block, params, x, key=key, train=train, state=state)
        if h.shape != x.shape:
            raise ValueError(f"{name}: block must keep the shape; input {x.shape}, block output {h.shape}")
        return x + h, {"block": cache, "y_shape": shape_token(h)}

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        grads, dx_block = block.backward(cache["block"], dy)
        return grads, dy + dx_block                     # fan-out: paths sum

    return Layer(init, forward, backward, name=name,
                 init_state=block.init_state, update_state=
                 (lambda state, cache: block.update_state(state, cache["block"])) if block.stateful else None,
                 stochastic=block.stochastic)

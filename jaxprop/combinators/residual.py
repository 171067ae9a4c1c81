r"""``residual(block)``: a skip connection, y = x + block(x)."""
from __future__ import annotations

from jaxprop.core import (Layer, call_forward, call_per_example, call_per_example_norms, check_same_shape,
                          shape_token, token_shape)


def residual(block: Layer) -> Layer:
    """Skip connection ``y = x + block(x)`` (block must keep the shape).

    x fans out to two paths (identity and block), so its gradient is the sum
    over both paths::

        dx = dy + dx_block,   dx_block from block.backward(cache, dy)
        grads = grads of block (the identity path has no parameters)

    The whole context (``key=``, ``state=``, ...) goes to the block. The
    identity path needs a floating-point x, so the block may not return
    ``dx = None``. Per example (:mod:`jaxprop.per_example`): the block's
    per-example rule, and the same dx = dy + dx_block.
    """
    name = f"residual({block.name})"

    def init(key, in_shape):
        out_shape, params = block.init(key, in_shape)
        if tuple(out_shape) != tuple(in_shape):
            raise ValueError(f"{name}: block must keep the shape; in {tuple(in_shape)}, out {tuple(out_shape)}")
        return tuple(in_shape), params

    def forward(params, x, **ctx):
        h, cache = call_forward(block, params, x, **ctx)
        if h.shape != x.shape:
            raise ValueError(f"{name}: block must keep the shape; input {x.shape}, block output {h.shape}")
        return x + h, {"block": cache, "y_shape": shape_token(h)}

    def through(rule, cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)
        grads, dx_block = rule(cache["block"], dy)
        if dx_block is None:
            raise ValueError(f"{name}: the block ({block.name}) returned dx=None; a skip connection "
                             "x + block(x) needs a floating-point x with a gradient on both paths")
        return grads, dy + dx_block                     # fan-out: paths sum

    def backward(cache, dy):
        return through(block.backward, cache, dy)

    def per_example(cache, dy):                         # the identity path has no parameters
        return through(lambda c, d: call_per_example(block, c, d), cache, dy)

    def per_example_norms(cache, dy):
        return through(lambda c, d: call_per_example_norms(block, c, d), cache, dy)

    return Layer(init, forward, backward, name=name,
                 init_state=block.init_state, update_state=
                 (lambda state, cache: block.update_state(state, cache["block"])) if block.stateful else None,
                 stochastic=block.stochastic, per_example=per_example, per_example_norms=per_example_norms)

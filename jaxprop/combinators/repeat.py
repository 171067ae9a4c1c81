r"""``repeat(block, n)``: n identical blocks as one loop, forward and backward.

``serial(block, block, ...)`` unrolls the network into the program, so
tracing and compile time grow with depth. ``repeat`` keeps one copy of the
block in the program and runs it n times with ``jax.lax.scan``; the
parameters of the n copies are stacked along a new leading axis. With
x_0 = x and theta_k the k-th slice of the stacked parameters::

    forward   x_k = f(theta_k, x_{k-1}),          k = 1..n      (scan)
              cache_k = what f's backward needs
    backward  (dtheta_k, dx_{k-1}) = f.backward(cache_k, dx_k),  k = n..1   (reverse scan)
              dx_n = dy,  dx = dx_0

This is the reverse sweep of ``serial`` written literally as a loop: the
carry of the reverse scan is the upstream gradient dx_k, computed once and
handed to block k (the dynamic programme). The per-step parameter gradients
come out of the scan stacked, so ``grads`` has the structure of ``params``.
The result equals ``serial`` of the same blocks with the same parameters.

Per example (:mod:`jaxprop.per_example`) the reverse scan runs the block's
per-example rule instead: gradients (N, n, ...) (example first, then
block), squared norms summed over the blocks in the carry.

Memory: forward caches are stacked, one slice per step. A block's cache
entry that *is* one of its parameters (dense caches ``w``), its input
(dense caches x) or its output (``relu(save="output")`` caches y) is not
copied into the stack:
the stacked parameters are kept once, the step inputs x_0..x_{n-1} once
(x_k is the output of step k and the input of step k + 1), and each slice
is put back before that step's backward.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxprop.combinators.remat import remat as remat_layer
from jaxprop.core import (Layer, call_forward, call_per_example, call_per_example_norms, check_same_shape,
                          shape_token, token_shape)

_REF = "__jaxprop_ref__"     # marks a cache entry that is source number shape[-1] (see _strip)


def _sources(h, y, params):
    """What a step's cache may hold without copying: the step's input h,
    its output y, and the leaves of its parameters (in that order)."""
    return [h, y] + jax.tree_util.tree_leaves(params)


def _strip(cache, sources):
    """Replace every cache leaf that *is* one of ``sources`` (the same traced
    value) by a zero-size token ``{_REF: zeros((0, index))}``; return the
    stripped cache and the set of source indices used."""
    used = set()

    def strip(leaf):
        for i, src in enumerate(sources):
            if leaf is src:
                used.add(i)
                return {_REF: jnp.zeros((0, i), jnp.int8)}
        return leaf

    return jax.tree_util.tree_map(strip, cache), used


def _is_ref(node) -> bool:
    return isinstance(node, dict) and tuple(node) == (_REF,)


def _restore(cache, sources):
    """Inverse of :func:`_strip` for one step: put the sources back."""
    return jax.tree_util.tree_map(lambda node: sources[node[_REF].shape[-1]] if _is_ref(node) else node,
                                  cache, is_leaf=_is_ref)


def repeat(block: Layer, n: int, *, unroll: int = 1, remat: bool = False) -> Layer:
    r"""``n`` copies of a shape-keeping ``block``, each with its own parameters,
    applied in order by a ``lax.scan`` (see the module docstring for the math).

    Shapes: x, y, dy, dx (N, ...), all the same (the block must keep shape and
    dtype). Params: the block's params with every leaf stacked, (n, ...) ;
    grads likewise. The context is open (``forward(params, x, **ctx)``):
    ``key=`` is split into n keys, one per block; ``state=`` (batch norm) is
    the block's state stacked n times, one slice per block; every other
    keyword reaches each block unchanged.

    Args:
      block: the layer to repeat; its output shape must equal its input shape.
      n: number of copies (>= 1).
      unroll: passed to ``lax.scan`` (1 keeps the program smallest).
      remat: wrap the block in :func:`jaxprop.remat` inside the scan: each
        step caches only its input, and the reverse scan re-runs that step's
        forward before its backward (Chen et al. 2016). The stacked cache of
        n steps becomes n inputs plus one step's cache at a time.

    Compile time and program size do not grow with ``n``: ``repeat(block, 64)``
    compiles about as fast as ``repeat(block, 4)``.
    """
    if not isinstance(block, Layer):
        raise TypeError(f"repeat: block is {type(block).__name__}, not a jaxprop Layer")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"repeat: n must be a positive int, got {n!r}")
    if remat:
        block = remat_layer(block)
    name = f"repeat({block.name}, {n})"

    def init(key, in_shape):
        in_shape = tuple(in_shape)
        box = []

        def one(k):
            out_shape, params = block.init(k, in_shape)
            box.append(tuple(out_shape))
            return params

        params = jax.vmap(one)(jax.random.split(key, n))
        if box[0] != in_shape:
            raise ValueError(f"{name}: block must keep the shape; in {in_shape}, out {box[0]}")
        return in_shape, params

    def forward(params, x, **ctx):
        lead = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(params)}
        if lead and lead != {n}:
            raise ValueError(f"{name}: expected parameters stacked along a leading axis of size {n}, "
                             f"got leading sizes {sorted(lead)}")
        key = ctx.get("key")
        keys = None if key is None else jax.random.split(key, n)     # one key per block
        states = ctx.get("state") if block.stateful else None        # the block's state, stacked

        used = set()

        def step(h, xs):                               # x_k = f(theta_k, x_{k-1})
            p, k, s = xs
            child = dict(ctx)                           # every other keyword passes on unchanged
            if k is not None:
                child["key"] = k
            if states is not None:
                child["state"] = s
            y, cache = call_forward(block, p, h, **child)
            if y.shape != h.shape or y.dtype != h.dtype:
                raise ValueError(f"{name}: block must keep shape and dtype; input {h.shape} {h.dtype}, "
                                 f"output {y.shape} {y.dtype}")
            cache, refs = _strip(cache, _sources(h, y, p))
            used.update(refs)
            # inputs are stacked once when the cache refers to the input or the output of a step
            # (the output of step k is the input of step k + 1)
            return y, (cache, h if used & {0, 1} else None)

        y, (steps, inputs) = jax.lax.scan(step, x, (params, keys, states), length=n, unroll=unroll)
        return y, {"params": params, "steps": steps, "inputs": inputs,
                   "y": y if inputs is not None else None, "y_shape": shape_token(y)}

    def _reverse(cache, carry, fn):
        """Reverse scan over the steps with each step's cache restored:
        ``fn(carry, p_k, cache_k) -> (carry, out_k)``. The output of step k is
        carried from step k + 1 (it is that step's input), so it is not stacked."""
        inputs = cache["inputs"]

        def step(c, xs):
            carry, y_next = c
            p, st, h = xs
            restored = _restore(st, _sources(h, y_next, p))
            carry, out = fn(carry, p, restored)
            return (carry, h), out

        y_last = cache["y"]
        (carry, _), outs = jax.lax.scan(step, (carry, y_last), (cache["params"], cache["steps"], inputs),
                                        reverse=True, length=n, unroll=unroll)
        return carry, outs

    def backward(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)

        def step(d, p, c):                             # (dtheta_k, dx_{k-1}) = f.backward(cache_k, dx_k)
            grads, dx = block.backward(c, d)
            return block_dx(dx), grads

        return _reverse(cache, dy, step)[::-1]

    def block_dx(dx):
        if dx is None:
            raise ValueError(f"{name}: the block ({block.name}) returned dx=None; each block's input "
                             "is the previous block's output, which needs a gradient")
        return dx

    def per_example(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)

        def step(d, p, c):                             # block k's per-example rule, k = n..1
            grads, dx = call_per_example(block, c, d)
            return block_dx(dx), grads

        dx, grads = _reverse(cache, dy, step)
        # the scan stacks the steps first: (n, N, ...) -> (N, n, ...), example first like every rule
        return jax.tree_util.tree_map(lambda g: jnp.moveaxis(g, 0, 1), grads), dx

    def per_example_norms(cache, dy):
        check_same_shape(name, token_shape(cache["y_shape"]), dy)

        def step(carry, p, c):                         # squared norms add over the n blocks
            d, sq = carry
            sq_k, dx = call_per_example_norms(block, c, d)
            return (block_dx(dx), sq + sq_k.astype(sq.dtype)), None

        (dx, sq), _ = _reverse(cache, (dy, jnp.zeros(dy.shape[:1], dy.dtype)), step)
        return sq, dx

    def init_state(in_shape):
        s = block.init_state(tuple(in_shape))
        return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + a.shape), s)

    def update_state(state, cache):
        def step(carry, p, cache_and_state):
            c, s = cache_and_state
            return carry, block.update_state(s, c)
        # the state of step k rides along with its cache
        return _reverse(dict(cache, steps=(cache["steps"], state)), None, step)[1]

    return Layer(init, forward, backward, name=name,
                 init_state=init_state if block.stateful else None,
                 update_state=update_state if block.stateful else None,
                 stochastic=block.stochastic, per_example=per_example, per_example_norms=per_example_norms)


def stack_params(params_list):
    """Stack a list of n per-block params (e.g. from ``serial``) into
    ``repeat``'s layout: every leaf gets a leading axis of size n."""
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *params_list)


def unstack_params(params, n: int):
    """Inverse of :func:`stack_params`: a list of n per-block params."""
    return [jax.tree_util.tree_map(lambda a: a[i], params) for i in range(n)]

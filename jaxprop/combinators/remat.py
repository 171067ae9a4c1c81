r"""``remat(layer)``: keep a layer's input, not its cache; recompute in backward.

Backprop is a dynamic programme whose table is the forward caches: every
layer keeps what its backward needs (inputs, activations, masks, attention
probabilities) from the forward sweep until the reverse sweep reaches it, so
a network's peak memory is the sum of all its caches. ``remat`` trades that
table for recomputation (Chen, Xu, Zhang & Guestrin 2016, "Training deep
nets with sublinear memory cost")::

    forward    y = f(theta, x)                 cache = (x, theta, ctx)     f's cache dropped
    backward   _, c = f.forward(theta, x)      the forward once more, rebuilding f's cache
               dtheta, dx = f.backward(c, dy)

The gradients are those of ``f`` exactly (the same operations on the same
values); the cost is one extra forward of ``f``. Wrapping each of n blocks
keeps n block inputs plus one block's cache at a time instead of n caches;
with blocks of sqrt(n) layers that is the O(sqrt(n)) memory of Chen et al.

Keeping the recomputation apart: under ``jit`` XLA sees the recomputed
forward as the same expression as the first forward (same inputs, same
operations) and would merge the two (common-subexpression elimination),
keeping the first forward's intermediates alive until backward, which undoes
the point. The backward therefore passes its inputs (x, theta, the context
arrays) through ``lax.optimization_barrier`` *together with dy*: the
recomputation then depends on a value that exists only once the reverse
sweep has reached this layer, so it can neither be merged with the forward
nor scheduled before it is needed. That is enough on GPU and TPU and inside
a ``lax.scan`` body (``repeat``), but XLA:CPU removes optimization barriers
before its last CSE passes, and there a stack of ``remat`` layers in
``serial`` was merged back and saved nothing (measured: 16 residual MLP
blocks, 21.5 vs 21.8 MB of temporary memory). So the recomputation also
starts from ``select(dy_0 != dy_0, copysign(|x|, x), x)``: x itself, bit for
bit, in either branch, but an expression XLA cannot fold (a float
self-comparison is not constant) nor compute before dy exists. With it the
same stack needs 2.4 MB. (No ``jax.checkpoint``: that is the autodiff
machinery; this is the same idea in the hand-written sweep.)

The forward context is replayed: array keywords (``key=``, ``state=``,
``mask=``) are kept in the cache, ``True``/``False`` as zero-size tokens, and
``None`` as is, so a dropout mask is drawn again from the same key and
batch norm's batch statistics come out the same. For a stateful layer the
next state is computed in forward (it is small) and kept for
``update_state``.

Inside ``repeat`` the cache entries that are the block's input or its
parameters are not stored per step, so ``repeat(remat(block), n)`` keeps the
n inputs and nothing else.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxprop.core import Layer, call_forward, is_floating

_BOOL = "__jaxprop_bool__"


def _is_bool_token(node) -> bool:
    return isinstance(node, dict) and tuple(node) == (_BOOL,)


def _pack_ctx(name, ctx):
    """The context as a pytree of arrays: bools become zero-size tokens."""
    packed = {}
    for k, v in ctx.items():
        def leaf(a, k=k):
            if isinstance(a, bool):
                return {_BOOL: jnp.zeros((0, int(a)), jnp.int8)}
            if isinstance(a, jax.Array) or hasattr(a, "__jax_array__") or hasattr(a, "dtype"):
                return a
            raise ValueError(f"{name}: context keyword {k}={a!r} ({type(a).__name__}) cannot be replayed "
                             "in backward; remat keeps arrays, True/False and None only")
        packed[k] = jax.tree_util.tree_map(leaf, v)
    return packed


def _unpack_ctx(packed):
    return jax.tree_util.tree_map(lambda n: bool(n[_BOOL].shape[1]) if _is_bool_token(n) else n,
                                  packed, is_leaf=_is_bool_token)


def _barrier(tree):
    """``lax.optimization_barrier`` on the floating/integer leaves (PRNG key arrays pass around it)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    plain = [i for i, a in enumerate(leaves) if not jnp.issubdtype(jnp.result_type(a), jax.dtypes.prng_key)]
    held = lax.optimization_barrier([leaves[i] for i in plain])
    for i, a in zip(plain, held):
        leaves[i] = a
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _after(x, dy):
    """``x`` again, as a value XLA cannot compute before ``dy`` exists.

    ``select(dy_0 != dy_0, copysign(|x|, x), x)``: both branches are x bit for
    bit (NaN, -0.0 and all), whatever dy holds, but XLA folds neither a float
    self-comparison (NaN != NaN) nor ``copysign(|x|, x)``, so the select stays
    and the recomputed forward is a different expression from the first one.
    Needed on XLA:CPU, which expands optimization barriers before its last
    CSE passes (see the module docstring). Cost: one elementwise pass over x.
    An integer x (token ids) is left as is.
    """
    if dy is None or not is_floating(dy) or not is_floating(x) or dy.size == 0:
        return x
    d0 = dy.reshape(-1)[0]
    return jnp.where(d0 != d0, jnp.copysign(jnp.abs(x), x), x)


def remat(layer: Layer) -> Layer:
    r"""``layer`` that caches only its input (and params, context); its backward re-runs
    ``layer``'s forward to rebuild the cache, then ``layer``'s backward.

    Same forward output, same gradients (bit for bit: the same computation),
    one extra forward per backward. See the module docstring for why the
    recomputation goes through ``lax.optimization_barrier``.

    Shapes, params and grads: those of ``layer``. Cache:
    ``{"x": x, "params": params, "ctx": context arrays[, "state": next state]}``.
    """
    if not isinstance(layer, Layer):
        raise TypeError(f"remat: expected a jaxprop Layer, got {type(layer).__name__}")
    name = f"remat({layer.name})"

    def forward(params, x, **ctx):
        y, inner = call_forward(layer, params, x, **ctx)
        cache = {"x": x, "params": params, "ctx": _pack_ctx(name, ctx)}
        if layer.stateful and ctx.get("state") is not None:
            cache["state"] = layer.update_state(ctx["state"], inner)
        del inner                                     # the point: the layer's cache is not kept
        return y, cache

    def backward(cache, dy):
        # dy joins the barrier: the recomputation waits for the reverse sweep and is not merged
        # with the first forward.
        x, params, packed, dy = _barrier((cache["x"], cache["params"], cache["ctx"], dy))
        x = _after(x, dy)
        _, inner = call_forward(layer, params, x, **_unpack_ctx(packed))   # forward again
        return layer.backward(inner, dy)

    def update_state(state, cache):
        return cache.get("state", state)

    return Layer(layer.init, forward, backward, name=name, init_state=layer.init_state,
                 update_state=update_state if layer.stateful else None, stochastic=layer.stochastic)

r"""Embedding: integer token ids to rows of a learned table."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Layer, check_same_shape, default_float, is_concrete, shape_token, token_shape
from jaxprop.layers._params import check_params


def embedding(vocab_size: int, features: int) -> Layer:
    r"""Look up row ``ids[...]`` of a table W: PyTorch's ``nn.Embedding(V, D)``.

    Shapes: ids (N, ...) integers in [0, V) (typically (N, T)); W (V, D);
    y (N, ..., D). With M = the number of ids and E (M, V) their one-hot rows
    (E_mv = [ids_m = v]), the lookup is a product::

        Y[m, :] = W[ids_m, :]          Y = E W                  (M, V) @ (V, D)

    Backward::

        dW = E^T dY                    dW[v, :] = sum_{m : ids_m = v} dY[m, :]     (V, D)

    a scatter-add of dY's rows at the ids (an id that occurs k times receives
    the sum of its k rows; ids that do not occur get zero), computed without
    forming E: ``zeros_like(W).at[ids].add(dY)``. The ids are integers, so
    they get no gradient: ``backward`` returns ``dx = None``.

    Args:
      vocab_size: V, the number of rows.
      features: D, the width of each row.

    Params: ``{"w": (V, D)}``, initialized N(0, 1) as PyTorch does (each
    embedding starts with unit-variance entries, whatever V and D).

    Out-of-range ids (< 0 or >= V) are a ``ValueError`` when the ids are
    concrete (eager calls). Under ``jit`` they cannot be checked; such an id
    then looks up a row of NaN (so the loss shows it) and its dY row is
    dropped from dW. Negative ids never wrap around as in NumPy indexing.
    Float ids are a ``ValueError`` at trace time.
    """
    for arg, val in (("vocab_size", vocab_size), ("features", features)):
        if not isinstance(val, int) or isinstance(val, bool) or not 1 <= val < 2 ** 31:
            raise ValueError(f"embedding: {arg} must be an int in [1, 2**31), got {val!r}")
    name = f"embedding({vocab_size}, {features})"
    V, D = vocab_size, features

    def init(key, in_shape):
        if len(in_shape) < 1:
            raise ValueError(f"{name}: in_shape must include the batch axis, (N, ...); got {tuple(in_shape)}")
        return tuple(in_shape) + (D,), {"w": jax.random.normal(key, (V, D), default_float())}

    def forward(params, ids):
        check_params(name, params, {"w": (V, D)})
        w = params["w"]
        dt = jnp.result_type(ids)
        if not jnp.issubdtype(dt, jnp.integer):
            raise ValueError(f"{name}: expected integer token ids (N, ...), got dtype {dt} with shape "
                             f"{tuple(jnp.shape(ids))} (cast whole-number ids with .astype(jnp.int32))")
        if jnp.ndim(ids) < 1:
            raise ValueError(f"{name}: expected ids with a batch axis (N, ...), got shape {tuple(jnp.shape(ids))}")
        if is_concrete(ids) and np.size(ids):
            host = np.asarray(ids)                       # concrete: values known now
            lo, hi = int(host.min()), int(host.max())
            if lo < 0 or hi >= V:
                raise ValueError(f"{name}: token ids must lie in [0, {V}), got ids from {lo} to {hi}")
        ids = jnp.asarray(ids).astype(jnp.int32)
        ids = jnp.where((ids >= 0) & (ids < V), ids, V)  # under jit: out of range -> V -> a NaN row
        y = jnp.take(w, ids, axis=0, mode="fill", fill_value=jnp.nan)    # Y[m, :] = W[ids_m, :]
        return y, {"ids": ids, "w": shape_token(w)}

    def backward(cache, dy):
        ids, w_token = cache["ids"], cache["w"]
        check_same_shape(name, tuple(ids.shape) + (D,), dy)
        dw = jnp.zeros(token_shape(w_token), w_token.dtype)
        dw = dw.at[ids].add(dy.astype(w_token.dtype), mode="drop")    # forward was: y = w[ids]
        return {"w": dw}, None                                          # integer ids: no gradient

    return Layer(init, forward, backward, name=name, per_example=_per_example, per_example_norms=_per_example_norms)


# ------------------------------------------------------------------ per example (jaxprop.per_example)
# dW_n = E_n^T dY_n: the scatter-add of example n's rows only, (N, V, D). Its squared norm without the
# (N, V, D) array (when that is the larger one) is the Gram form with the one-hot rows' products
# E_n E_n^T = [ids_nt = ids_nt'] (Li et al. 2022): ||dW_n||^2 = sum_{t,t'} [ids_nt = ids_nt'] <dY_nt, dY_nt'>.

def _per_example(cache, dy):
    ids, w_token = cache["ids"], cache["w"]
    (v, d), n = token_shape(w_token), ids.shape[0]
    check_same_shape("embedding", tuple(ids.shape) + (d,), dy)
    ids2, dy2 = ids.reshape(n, -1), dy.reshape(n, -1, d).astype(w_token.dtype)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids2.shape)
    dw = jnp.zeros((n, v, d), w_token.dtype).at[rows, ids2].add(dy2, mode="drop")  # forward was: y = w[ids]
    return {"w": dw}, None


def _per_example_norms(cache, dy):
    ids, w_token = cache["ids"], cache["w"]
    (v, d), n = token_shape(w_token), ids.shape[0]
    check_same_shape("embedding", tuple(ids.shape) + (d,), dy)
    ids2, dy2 = ids.reshape(n, -1), dy.reshape(n, -1, d).astype(w_token.dtype)
    t = ids2.shape[1]
    if t * t > v * d:
        dw = _per_example(cache, dy)[0]["w"]
        return (dw * dw).sum(axis=(1, 2)), None
    same = (ids2[:, :, None] == ids2[:, None, :]) & (ids2 < v)[:, :, None]     # out-of-range ids are dropped
    gram = dy2 @ dy2.transpose(0, 2, 1)                                           # (N, T, T)
    return jnp.where(same, gram, jnp.zeros((), gram.dtype)).sum(axis=(1, 2)), None

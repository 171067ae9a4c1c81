r"""Per-example gradients, their norms, and DP-SGD -- from the hand-written backward.

The backward of every layer already holds what each example contributes:
a dense layer's cache has X (N, I), its dY (N, O), and its weight gradient is
the sum over n of the outer products x_n dy_n^T. Keeping the terms apart gives
per-example gradients; their norms need not even form them, since
||x_n dy_n^T||^2 = ||x_n||^2 ||dy_n||^2 (Goodfellow 2015; Li et al. 2022 for
sequences and convolutions, "ghost clipping"). ``jax.vmap(jax.grad(...))``
gets the same numbers by holding N copies of every parameter.

**What "per example" means.** J is the loss of the batch, the mean over its
N examples (``softmax_cross_entropy``, ``mse``... with ``where=``: the
counted positions, each example's share), J = (1/N) sum_n l_n. The
gradient of example n is that of its own term, g_n = d l_n / d theta, so that
mean_n g_n = dJ/dtheta. The drivers below call the loss backward with
dvalue = N: row n of dpred is then d l_n / d pred_n, and for a network whose
forward treats the examples independently, each layer's dY has rows of
single examples too. Each layer turns (cache, dY) into per-example results
with its rule, next to its backward (:attr:`jaxprop.Layer.per_example`,
:func:`jaxprop.core.call_per_example`):

=============================  ===============================================
dense                          dW_n = X_n^T dY_n, db_n; norms ||x_n||^2||dy_n||^2
                               (Gram form <X_n X_n^T, dY_n dY_n^T> for (N, T, I))
conv1d / conv2d                the kernel gradient's correlation per example;
                               norms by the Gram form over output positions
                               when that is smaller
layer_norm, group_norm,        dgamma_n, dbeta_n: the parameter sums without
batch_norm(train=False)        the sum over n
batch_norm (training)          refuses (it mixes the examples): use group_norm
layers without parameters      their backward (activations, pooling, reshape,
                               dropout)
serial, residual, repeat       the same sweeps over their children's rules
=============================  ===============================================

A layer with parameters and no rule raises
:class:`jaxprop.core.PerExampleUnsupported` naming it -- never a wrong number.
Nothing here calls autodiff.

**Clipping without per-example gradients.** DP-SGD (Abadi et al. 2016)
needs sum_n c_n g_n with c_n = min(1, C / ||g_n||). The network's backward
is linear in its dy: ``net.backward(cache, dP)`` = J_theta^T dP, a sum over
the rows of dP. With dP = dpred (rows d l_n / d pred_n) and c scaling row n::

    net.backward(cache, c * dpred) = sum_n c_n J_theta^T (row n of dpred)
                                   = sum_n c_n d l_n / d theta = sum_n c_n g_n

(for a network that does not mix examples, row n of dpred reaches theta
only through example n's own computation). So one sweep of norms
(:func:`per_example_grad_norms`, no per-example gradient formed) gives c, and
one ordinary backward with the reweighted dpred -- the clip factors as
per-example loss weights -- gives the clipped sum: one forward, two
backwards, memory of an ordinary step plus the norms' (N, T, T) Gram terms
at most.

**optax equivalence.** :func:`dp_value_and_grad` returns what
``optax.contrib.differentially_private_aggregate(l2_clip, noise_multiplier,
key)`` returns from ``jax.vmap(jax.grad(l_n))`` with a state just made by
its ``init`` (optax 0.2.8, read from its source): per-example factors
``nan_to_num(minimum(C / ||g_n||, 1), nan=1)``, the sum over n, for leaf i
of ``jax.tree.flatten(grads)`` the noise ``std * normal(rngs[i], shape,
dtype)`` with ``_, *rngs = jax.random.split(key, leaves + 1)`` and
std = C noise_multiplier, then ``(sum + noise) / N``. optax's next state
holds ``jax.random.split(key, leaves + 1)[0]``; :func:`next_key` gives that
key, so a loop that passes ``key = next_key(key, params)`` after each step
draws exactly optax's noise sequence. The runner's DP option puts the noise
in the optimizer instead (:func:`dp_noise`, the same key sequence, the key
checkpointed with the optimizer state).

**Privacy.** :func:`epsilon` asks ``dp-accounting`` (Google's accountant,
``pip install 'jaxprop[dp]'``) for epsilon of the subsampled Gaussian
mechanism after ``steps`` steps at sampling rate q = B / N_train (Poisson
sampling assumed, as usual; fixed-size shuffled batches are the common
approximation of it).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxprop.core import (Layer, Loss, PerExampleUnsupported, call_per_example, call_per_example_norms,
                          check_grads, require_state)
from jaxprop.grad import forward_loss, next_state

__all__ = ["PerExampleUnsupported", "ClippedGrad", "DPNoiseState", "clip_factors", "clipped_value_and_grad",
           "dp_noise", "dp_value_and_grad", "epsilon", "next_key", "per_example_grad_norms",
           "per_example_grads"]


def _check(net, loss, who):
    if not isinstance(net, Layer):
        raise TypeError(f"{who}: net must be a jaxprop Layer, got {type(net).__name__}")
    if not isinstance(loss, Loss):
        raise TypeError(f"{who}: loss must be a jaxprop Loss, got {type(loss).__name__} "
                        "(did you forget the call, e.g. jp.mse()?)")


def _batch_size(x) -> int:
    leaves = jax.tree_util.tree_leaves(x)
    if not leaves or jnp.ndim(leaves[0]) < 1:
        raise ValueError("per-example gradients: x needs a leading batch axis (N, ...)")
    return int(jnp.shape(leaves[0])[0])


def _sweep(net, loss, params, x, y, where, ctx):
    """Forward and loss with dvalue = N: dpred's row n is d l_n / d pred_n."""
    require_state(net, ctx.get("state"))
    n = _batch_size(x)
    value, dpred, _, cache = forward_loss(net, loss, params, x, y, dvalue=n, where=where, **ctx)
    return n, value, dpred, cache


def _check_chunk_size(who, chunk_size):
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"{who}: chunk_size must be a positive int or None, got {chunk_size!r}")


def _chunks(who, net, x, y, where, ctx, chunk_size):
    """Split the batch for a sequential sweep over chunks of ``chunk_size`` examples:
    ``(n, k, head, tail)`` with ``head = (xs, ys)`` of leading axes (k, chunk_size)
    for ``lax.map`` / ``lax.scan`` and ``tail = (x, y)`` of the last N - k chunk_size
    examples (``None`` when the chunks tile the batch).

    Exact, for a network that does not mix examples: example n's l_n, its dY
    rows and so its gradient are the same whichever examples share its chunk
    (dvalue = chunk size per chunk, as :func:`_sweep`). Refused where that
    is not so: ``where=`` (the loss divides by the count of the whole batch's
    positions, which a chunk does not see), a ``key`` (dropout would draw other
    masks per chunk), and a net with state in training (batch norm mixes the
    examples anyway)."""
    if where is not None:
        raise ValueError(f"{who}: chunk_size with where= is not supported (the loss normalizes by the "
                         "count over the whole batch); pass chunk_size=None")
    if "key" in ctx:
        raise ValueError(f"{who}: chunk_size with a key (dropout) is not supported: each chunk would draw "
                         "other masks than the whole batch; pass chunk_size=None")
    if net.stateful and ctx.get("train", True):
        raise PerExampleUnsupported(f"{net.name}: a network with state in training mode (batch norm) mixes the "
                                    "examples of a batch, so it has no per-example gradients; use group_norm")
    n = _batch_size(x)
    k = n // chunk_size

    def split(a):
        return jax.tree_util.tree_map(lambda v: v[:k * chunk_size].reshape((k, chunk_size) + v.shape[1:]), a)

    def rest(a):
        return jax.tree_util.tree_map(lambda v: v[k * chunk_size:], a)

    head = (split(x), split(y)) if k else None
    tail = (rest(x), rest(y)) if n % chunk_size else None
    return n, k, head, tail


def _check_per_example(name, grads, params, n):
    """Per-example grads: params' structure, every leaf (N,) + its parameter's shape and dtype."""
    g_def, p_def = jax.tree_util.tree_structure(grads), jax.tree_util.tree_structure(params)
    if g_def != p_def:
        raise ValueError(f"{name}: the per-example rule returned grads with structure {g_def}, expected the "
                         f"structure of params {p_def}")
    for (path, g), p in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree_util.tree_leaves(params)):
        want = (n,) + tuple(jnp.shape(p))
        if tuple(g.shape) != want or g.dtype != jnp.result_type(p):
            raise ValueError(f"{name}: the per-example rule returned grads{jax.tree_util.keystr(path)} of "
                             f"shape {tuple(g.shape)} {g.dtype}, expected {want} {jnp.result_type(p)} "
                             "(the batch axis, then the parameter's shape)")


def per_example_grads(net: Layer, loss: Loss):
    """Return ``f(params, x, y, *, where=None, **ctx) -> grads`` with every leaf
    of ``grads`` of shape (N,) + the parameter's: ``grads[...][n]`` is the
    gradient of example n's loss term l_n, where J = mean_n l_n (module
    docstring), so their mean over n is ``jp.grad(net, loss)``'s.

    Raises :class:`~jaxprop.core.PerExampleUnsupported` (a ``ValueError``)
    naming the first layer without a rule, or batch norm in training mode.
    """
    _check(net, loss, "per_example_grads")

    def f(params, x, y, *, where=None, **ctx):
        n, _, dpred, cache = _sweep(net, loss, params, x, y, where, ctx)
        grads, _ = call_per_example(net, cache, dpred)
        _check_per_example(net.name, grads, params, n)
        return grads

    return f


def per_example_grad_norms(net: Layer, loss: Loss, *, chunk_size: int | None = None):
    """Return ``f(params, x, y, *, where=None, **ctx) -> norms`` (N,): the global
    L2 norm of each example's gradient over all parameters,
    ``sqrt(sum_leaves ||g_n||^2)``, from each layer's norms rule -- no
    (N, I, O) array for a dense layer (||x_n||^2 ||dy_n||^2, or the Gram form
    for sequences), see the module docstring.

    ``chunk_size``: run the forward and the norms sweep over the batch in
    sequential chunks of that many examples (a ``lax.map``; the last chunk
    takes the remainder), so that only one chunk's caches are alive at a
    time: temporary memory falls about as N / chunk_size, at some loss of
    speed (smaller products, a loop). The same norms (to rounding) for a
    network that does not mix examples; not with ``where=`` or a dropout
    ``key`` (a ValueError). ``None`` (default): the whole batch at once."""
    _check(net, loss, "per_example_grad_norms")
    _check_chunk_size("per_example_grad_norms", chunk_size)

    def norms(params, x, y, where, ctx):
        _, _, dpred, cache = _sweep(net, loss, params, x, y, where, ctx)
        sq, _ = call_per_example_norms(net, cache, dpred)
        return jnp.sqrt(sq)

    def f(params, x, y, *, where=None, **ctx):
        if chunk_size is None:
            return norms(params, x, y, where, ctx)
        _, k, head, tail = _chunks("per_example_grad_norms", net, x, y, where, ctx, chunk_size)
        parts = []
        if head is not None:
            parts.append(jax.lax.map(lambda xy: norms(params, xy[0], xy[1], None, ctx), head).reshape(-1))
        if tail is not None:
            parts.append(norms(params, tail[0], tail[1], None, ctx))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts)

    return f


def clip_factors(norms, l2_clip):
    """c_n = min(1, C / ||g_n||), 1 where that is 0/0 (optax's
    ``per_example_global_norm_clip``: ``nan_to_num(minimum(C / norm, 1), nan=1)``)."""
    return jnp.nan_to_num(jnp.minimum(l2_clip / norms, 1.0), nan=1.0)


def _clipped_sum(net, loss, l2_clip, params, x, y, where, ctx, chunk_size=None):
    """``(n, value, sum_n c_n g_n, cache)``: the norms sweep, then one backward with
    dpred's rows scaled by c_n (module docstring: the clip factors as loss weights).
    With ``chunk_size``, chunk by chunk (:func:`_chunks`): a ``lax.scan`` adds the
    chunks' clipped sums, the value is the size-weighted mean of theirs, and
    ``cache`` is ``None`` (the net has no state to update: :func:`_chunks`)."""
    if chunk_size is None:
        n, value, dpred, cache = _sweep(net, loss, params, x, y, where, ctx)
        return (n, value, _reweighted_backward(net, l2_clip, params, dpred, cache), cache)
    n, k, head, tail = _chunks("the clipped gradient", net, x, y, where, ctx, chunk_size)

    def one(xc, yc):
        m, value, dpred, cache = _sweep(net, loss, params, xc, yc, None, ctx)
        return value * m, _reweighted_backward(net, l2_clip, params, dpred, cache)

    def body(carry, xy):
        v, g = one(*xy)
        return jax.tree_util.tree_map(jnp.add, carry, (v, g)), None

    parts = []
    if head is not None:
        v0, g0 = jax.eval_shape(one, jax.tree_util.tree_map(lambda a: a[0], head[0]),
                                jax.tree_util.tree_map(lambda a: a[0], head[1]))
        zeros = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), (v0, g0))
        parts.append(jax.lax.scan(body, zeros, head)[0])
    if tail is not None:
        parts.append(one(*tail))
    value, total = parts[0] if len(parts) == 1 else jax.tree_util.tree_map(jnp.add, *parts)
    return n, value / n, total, None


def _reweighted_backward(net, l2_clip, params, dpred, cache):
    """sum_n c_n g_n: the norms rule gives c, then one backward of c * dpred."""
    n = dpred.shape[0]
    sq, _ = call_per_example_norms(net, cache, dpred)
    c = clip_factors(jnp.sqrt(sq), l2_clip).astype(dpred.dtype)
    total, _ = net.backward(cache, dpred * c.reshape((n,) + (1,) * (dpred.ndim - 1)))
    check_grads(net.name, total, params)
    return total


def _result(net, value, grads, cache, ctx):
    """(value, grads), or ((value, state), grads) for a net with state, as jp.value_and_grad
    (``cache`` None: a chunked sweep, in evaluation mode, leaves the state alone)."""
    if net.stateful and cache is None:
        return (value, ctx["state"]), grads
    if net.stateful:
        return (value, next_state(net, ctx["state"], cache, train=ctx.get("train", True))), grads
    return value, grads


def _check_clip(who, l2_clip, noise_multiplier=0.0):
    """Python numbers are checked; arrays (traced hyperparameters) are taken as they are."""
    if isinstance(l2_clip, (int, float)) and not (math.isfinite(l2_clip) and l2_clip > 0):
        raise ValueError(f"{who}: l2_clip must be a positive finite number, got {l2_clip!r}")
    if isinstance(noise_multiplier, (int, float)) and not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"{who}: noise_multiplier must be a finite number >= 0, got {noise_multiplier!r}")


def clipped_value_and_grad(net: Layer, loss: Loss, l2_clip, *, chunk_size: int | None = None):
    """Return ``f(params, x, y, *, where=None, **ctx) -> (J, (1/N) sum_n c_n g_n)``:
    DP-SGD's clipped mean without the noise (c_n = :func:`clip_factors`), in
    the call shape of :func:`jaxprop.value_and_grad` (so a train step takes
    it; the runner adds the noise with :func:`dp_noise` in the optimizer).
    J is the ordinary (unclipped) batch loss. ``chunk_size``: the sweep over
    sequential chunks of the batch, as :func:`per_example_grad_norms`'s (less
    memory, the same numbers to rounding)."""
    _check(net, loss, "clipped_value_and_grad")
    _check_clip("clipped_value_and_grad", l2_clip)
    _check_chunk_size("clipped_value_and_grad", chunk_size)

    def f(params, x, y, *, where=None, **ctx):
        n, value, total, cache = _clipped_sum(net, loss, l2_clip, params, x, y, where, ctx, chunk_size)
        return _result(net, value, jax.tree_util.tree_map(lambda g: g / n, total), cache, ctx)

    return f


def _as_key(key):
    """A typed key from an int seed, a typed key, or raw uint32 key data (as optax takes them)."""
    if isinstance(key, int):
        return jax.random.key(key)
    if not jnp.issubdtype(jnp.result_type(key), jax.dtypes.prng_key):
        return jax.random.wrap_key_data(key)
    return key


def dp_value_and_grad(net: Layer, loss: Loss, l2_clip, noise_multiplier, *, chunk_size: int | None = None):
    """Return ``f(params, x, y, key, *, where=None, **ctx) -> (J, grads)``, DP-SGD's
    clipped and noised mean gradient::

        grads = (sum_n c_n g_n + N(0, (C sigma)^2 I)) / N,   c_n = min(1, C / ||g_n||)

    with C = ``l2_clip``, sigma = ``noise_multiplier``: exactly what optax's
    ``differentially_private_aggregate(C, sigma, key)`` makes of the
    per-example gradients with a fresh state (module docstring; the same
    noise from the same ``key``, an int seed or a typed key). ``key`` is the
    noise's; a dropout key goes in ``ctx`` as ``key=`` like everywhere. Use
    :func:`next_key` to go on as optax's state does. J is the ordinary batch
    loss; a net with state returns ``((J, state), grads)``.

    Cost: one forward, the norms sweep and one ordinary backward; no
    per-example gradient is formed for dense layers. ``chunk_size``: all of it
    over sequential chunks of the batch (:func:`per_example_grad_norms`).
    """
    _check(net, loss, "dp_value_and_grad")
    _check_clip("dp_value_and_grad", l2_clip, noise_multiplier)
    _check_chunk_size("dp_value_and_grad", chunk_size)
    std = l2_clip * noise_multiplier

    def f(params, x, y, noise_key, *, where=None, **ctx):
        n, value, total, cache = _clipped_sum(net, loss, l2_clip, params, x, y, where, ctx, chunk_size)
        leaves, treedef = jax.tree_util.tree_flatten(total)
        _, *rngs = jax.random.split(_as_key(noise_key), len(leaves) + 1)     # optax's split
        noised = [(g + std * jax.random.normal(r, g.shape, g.dtype)) / n for g, r in zip(leaves, rngs)]
        return _result(net, value, jax.tree_util.tree_unflatten(treedef, noised), cache, ctx)

    return f


def next_key(key, params):
    """The noise key of the next step: ``jax.random.split(key, leaves + 1)[0]``,
    as optax's ``differentially_private_aggregate`` state advances."""
    return jax.random.split(_as_key(key), len(jax.tree_util.tree_leaves(params)) + 1)[0]


class ClippedGrad(NamedTuple):
    """``(net, loss) -> clipped_value_and_grad(net, loss, l2_clip, chunk_size=...)``:
    a gradient function factory for :func:`jaxprop.train.fit`'s ``grad=``
    (hashable, so fit's compiled step is cached per clip)."""

    l2_clip: float
    chunk_size: int | None = None

    def __call__(self, net, loss):
        return clipped_value_and_grad(net, loss, self.l2_clip, chunk_size=self.chunk_size)


class DPNoiseState(NamedTuple):
    """The key of the next noise draw, as raw ``jax.random.key_data`` (uint32), so
    that the state is an ordinary array tree and checkpoints like any other."""

    rng_key: Any


def dp_noise(l2_clip, noise_multiplier, batch_size: int, key) -> optax.GradientTransformation:
    """An optax transformation adding DP-SGD's noise to a clipped *mean*
    (:func:`clipped_value_and_grad`)::

        updates + (C sigma / B) N(0, I)        (B = batch_size)

    drawn per leaf from the key in its state, which advances as optax's
    ``differentially_private_aggregate`` state does; so ``chain(dp_noise(C,
    sigma, B, key), tx)`` after the clipped mean is optax's DP aggregate
    followed by ``tx`` (the same noise; (S + noise) / B computed as S / B +
    noise / B, equal to rounding). Its state is checkpointed with the
    optimizer's, so a resumed run draws the same noise."""
    _check_clip("dp_noise", l2_clip, noise_multiplier)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"dp_noise: batch_size must be a positive int, got {batch_size!r}")
    std = l2_clip * noise_multiplier

    def init(params):
        del params
        return DPNoiseState(jax.random.key_data(_as_key(key)))

    def update(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        new_key, *rngs = jax.random.split(jax.random.wrap_key_data(state.rng_key), len(leaves) + 1)
        noised = [g + std * jax.random.normal(r, g.shape, g.dtype) / batch_size for g, r in zip(leaves, rngs)]
        return jax.tree_util.tree_unflatten(treedef, noised), DPNoiseState(jax.random.key_data(new_key))

    return optax.GradientTransformation(init, update)


def epsilon(noise_multiplier: float, sampling_rate: float, steps: int, delta: float, *,
            accountant: str = "rdp") -> float:
    """epsilon of DP-SGD: ``steps`` compositions of the Poisson-subsampled
    Gaussian mechanism (rate q = ``sampling_rate``, noise sigma =
    ``noise_multiplier``), at ``delta``, by ``dp-accounting``'s RDP accountant
    (``accountant="rdp"``, Mironov 2017) or its privacy-loss-distribution one
    (``"pld"``: tighter, slower). ``inf`` without noise. Needs
    ``pip install dp-accounting`` (``jaxprop[dp]``), imported only here."""
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except ImportError:
        raise ImportError("jaxprop.per_example.epsilon needs the dp-accounting package: "
                          "pip install 'jaxprop[dp]' (or pip install dp-accounting)") from None
    if not 0 < sampling_rate <= 1:
        raise ValueError(f"epsilon: sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if not 0 < delta < 1:
        raise ValueError(f"epsilon: delta must be in (0, 1), got {delta!r}")
    if not isinstance(steps, int) or steps < 0:
        raise ValueError(f"epsilon: steps must be an int >= 0, got {steps!r}")
    if noise_multiplier < 0:
        raise ValueError(f"epsilon: noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountants = {"rdp": rdp.RdpAccountant, "pld": pld.PLDAccountant}
    if accountant not in accountants:
        raise ValueError(f"epsilon: accountant must be 'rdp' or 'pld', got {accountant!r}")
    acc = accountants[accountant]()
    event = dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    acc.compose(event, steps)
    return float(acc.get_epsilon(delta))

r"""Losses: ``forward(pred, target, **kw) -> (J, cache)`` and
``backward(cache, dvalue=1.0) -> dpred``.

``dvalue`` is a scalar (dJ_outer/dJ for a loss used inside a larger cost, or
a loss scale); it scales the result. A non-scalar ``dvalue`` is a
``ValueError``: it would broadcast into a wrong dpred without complaint.

J is a mean over the batch axis N = pred.shape[0] by default (the design
notes' J). ``mse`` and ``sigmoid_binary_cross_entropy`` also take
``reduction="mean"`` (the element mean of PyTorch, Keras and optax) or
``"sum"``; ``softmax_cross_entropy`` averages over every leading position of
(N, ..., C) logits, or only over the positions a ``where=`` mask counts.

Nothing is a silent wrong answer: an empty batch (N = 0), labels outside
[0, C), probability targets that do not sum to 1 and binary targets outside
[0, 1] are a ``ValueError`` naming the loss when the values are concrete;
under ``jit`` (values unknown at trace time) out-of-range labels make J and
dpred NaN.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Loss, check_float, is_concrete

REDUCTIONS = ("batch", "mean", "sum")


def _check_reduction(name, reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of 'batch', 'mean', 'sum', got {reduction!r}")


def _denominator(reduction, shape):
    """D of J = (1/D) sum: N ("batch"), the element count ("mean"), 1 ("sum")."""
    if reduction == "batch":
        return shape[0]
    if reduction == "mean":
        return math.prod(shape)
    return 1


def _check_not_empty(name, pred):
    shape = tuple(np.shape(pred))
    if shape and shape[0] == 0:
        raise ValueError(f"{name}: empty batch (N = 0) in predictions of shape {shape}: "
                         "J, a mean over the batch, is undefined")
    if math.prod(shape) == 0:
        raise ValueError(f"{name}: predictions of shape {shape} have no elements")


def _check_pair(name, pred, target, *, same_shape=True):
    check_float(name, pred, "prediction")
    if np.ndim(pred) < 1:
        raise ValueError(f"{name}: predictions need a batch axis, got shape {np.shape(pred)}")
    _check_not_empty(name, pred)
    if np.shape(target)[:1] != np.shape(pred)[:1]:
        raise ValueError(f"{name}: batch size of targets {np.shape(target)} differs from "
                         f"predictions {np.shape(pred)}")
    if same_shape and np.shape(target) != np.shape(pred):
        raise ValueError(f"{name}: expected target of shape {np.shape(pred)} (same as predictions), "
                         f"got {np.shape(target)}")


def _scale(name, dvalue, n, dtype):
    """dvalue / n, with dvalue a scalar."""
    if np.ndim(dvalue) != 0:
        raise ValueError(f"{name}: dvalue must be a scalar (dJ_outer/dJ), got shape {np.shape(dvalue)}; "
                         "a non-scalar would broadcast into a wrong dpred")
    return jnp.asarray(dvalue, dtype) / n


def _sum_tolerance(dtype, c):
    """How far from 1 a row of C probabilities in ``dtype`` may sum (rounding, not a bug)."""
    eps = float(jnp.finfo(dtype).eps)
    return max(math.sqrt(eps), 4 * c * eps)


def mse(reduction: str = "batch") -> Loss:
    r"""Squared error.

    pred, target: (N, ...), r = pred - target::

        J       = (1/D) sum_n sum_j r_nj^2
        dpred   = (2/D) r * dJ                    (N, ...)
        dtarget = -dpred

    D = N for ``reduction="batch"`` (default: summed over outputs, mean over
    the batch, the design notes' J), D = N * prod(...) for ``"mean"`` (the
    element mean of PyTorch/optax), D = 1 for ``"sum"``.
    """
    name = "mse"
    _check_reduction(name, reduction)

    def forward(pred, target):
        _check_pair(name, pred, target)
        check_float(name, target, "target")
        r = pred - target
        d = _denominator(reduction, r.shape)
        total = jnp.sum(r * r)
        return (total if reduction == "sum" else total / d), {"r": r}

    def backward(cache, dvalue=1.0):
        r = cache["r"]
        return 2 * _scale(name, dvalue, _denominator(reduction, r.shape), r.dtype) * r

    def backward_target(cache, dvalue=1.0):
        return -backward(cache, dvalue)

    return Loss(forward, backward, name, backward_target)


def softmax_cross_entropy(label_smoothing: float = 0.0) -> Loss:
    r"""Cross-entropy of softmax(logits) against labels or probabilities.

    ``forward(logits, target, where=None)``. logits z: (N, ..., C) (C classes
    on the last axis; (N, C) for a classifier, (N, T, C) for a sequence).
    target: integer labels (N, ...) in [0, C), or probabilities (N, ..., C).
    With smoothing e the target becomes q = (1 - e) t + e / C
    (t = onehot(labels) or the given probabilities). M = N * prod(...) is the
    number of leading positions m::

        log p = z - logsumexp(z)                  (stable: max-shifted, along C)
        J     = -(1/M) sum_m sum_c q_mc log p_mc
        dz    = (p * sum_c q - q) / M * dJ        = (softmax(z) - q) / M  when sum_c q = 1

    The fused form never forms 1/p, so |z| = 1000 gives finite values and
    gradients. For probability targets, dtarget = -(1 - e) log p / M * dJ.

    ``where``: a boolean (N, ...) mask of the positions that count (False
    on padding). J averages over the K = sum_m w_m counted positions only,
    and dz is exactly 0 on the others (their logits and labels are never
    read: a padding label such as -100 is fine)::

        J  = -(1/K) sum_{m: w_m} sum_c q_mc log p_mc
        dz = w (p * sum_c q - q) / K * dJ

    A mask that counts nothing (K = 0) gives J = 0 and dz = 0 (the sum over
    no positions, divided by max(K, 1)), not 0/0 = NaN: a batch, or a
    device's shard, made of padding only contributes nothing.

    Validation. Labels outside [0, C) (at counted positions) are a
    ``ValueError`` when they are concrete. Under ``jit`` their values are
    unknown at trace time; then any out-of-range label makes J and dz NaN
    (never a silent "probability 0"): the loss shows it, and so does every
    parameter a step updates with it. Concrete probability targets must be non-negative and sum to 1
    along C (within rounding of their dtype), else ``ValueError``. An empty
    batch (N = 0) is a ``ValueError``.

    Integer labels: sum_c q = (1 - e) + e = 1 exactly, so the backward is
    ``(p - q) / M * dJ``; the cache holds the labels, not the (N, ..., C)
    float q, which the backward rebuilds (under jit the one-hot fuses into
    the subtraction and is never stored).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    e = label_smoothing
    name = "softmax_cross_entropy"

    def forward(logits, target, where=None):
        check_float(name, logits, "logits")
        shape = tuple(np.shape(logits))
        if len(shape) < 2:
            raise ValueError(f"{name}: expected logits of shape (N, ..., C), got {shape}")
        lead, c = shape[:-1], shape[-1]
        _check_not_empty(name, logits)
        if where is not None:
            if jnp.result_type(where) != jnp.bool_ or tuple(np.shape(where)) != lead:
                raise ValueError(f"{name}: expected a boolean where mask of shape {lead} for logits "
                                 f"{shape}, got {jnp.result_type(where)} of shape {tuple(np.shape(where))}")
        concrete_where = where is None or is_concrete(where)
        labels = jnp.issubdtype(jnp.result_type(target), jnp.integer)
        invalid = None
        if labels:
            if np.shape(target) != lead:
                raise ValueError(f"{name}: expected integer labels of shape {lead} for logits "
                                 f"{shape}, got {np.shape(target)}")
            if is_concrete(target) and concrete_where:
                t = np.asarray(target)
                t = t if where is None else t[np.asarray(where)]
                if t.size and (t.min() < 0 or t.max() >= c):
                    raise ValueError(f"{name}: labels must lie in [0, {c}) for logits {shape}, "
                                     f"got values in [{t.min()}, {t.max()}]")
            else:      # under jit: J and dz become NaN rather than count a bad label as probability 0
                out = (target < 0) | (target >= c)
                invalid = jnp.any(out if where is None else out & where)
            t = jax.nn.one_hot(target, c, dtype=logits.dtype)
        else:
            _check_pair(name, logits, target)
            if is_concrete(target) and concrete_where:
                _check_probabilities(target, where, shape)
            t = target.astype(logits.dtype)
        q = (1 - e) * t + e / c if e else t
        logp = jax.nn.log_softmax(logits, axis=-1)
        if where is None:
            value = -jnp.sum(q * logp) / math.prod(lead)
            cache = {"logp": logp}
        else:
            count = jnp.maximum(jnp.sum(where, dtype=jnp.int32), 1).astype(logits.dtype)
            value = -jnp.sum(jnp.where(where[..., None], q * logp, jnp.zeros((), logp.dtype))) / count
            cache = {"logp": logp, "where": where, "count": count}
        if invalid is not None:
            value = jnp.where(invalid, jnp.nan, value)
            cache["invalid"] = invalid
        if labels:
            cache["labels"] = target
        else:
            cache["q"] = q
        return value, cache

    def _check_probabilities(target, where, shape):
        t = np.asarray(target, np.float64)
        if where is not None:
            t = t[np.asarray(where)]
        tol = _sum_tolerance(jnp.result_type(target) if jnp.issubdtype(jnp.result_type(target), jnp.floating)
                             else jnp.float32, shape[-1])
        if t.size == 0:
            return
        sums = t.sum(axis=-1)
        if t.min() < -tol or np.max(np.abs(sums - 1)) > tol:
            raise ValueError(f"{name}: float targets for logits {shape} must be probabilities "
                             f"(non-negative, summing to 1 along the last axis), got values in "
                             f"[{t.min():.4g}, {t.max():.4g}] with row sums in [{sums.min():.4g}, "
                             f"{sums.max():.4g}] (integer class labels: pass an integer array)")

    def _scaled(cache, dvalue):
        logp = cache["logp"]
        n = cache["count"] if "where" in cache else math.prod(logp.shape[:-1])
        s = _scale(name, dvalue, n, logp.dtype)
        if "invalid" in cache:                  # an out-of-range label under jit
            s = jnp.where(cache["invalid"], jnp.nan, s)
        return s

    def _masked(cache, d):
        if "where" in cache:
            return jnp.where(cache["where"][..., None], d, jnp.zeros((), d.dtype))
        return d

    def backward(cache, dvalue=1.0):
        logp = cache["logp"]
        p = jnp.exp(logp)
        s = _scaled(cache, dvalue)
        if "labels" in cache:                   # sum_c q = 1: dz = (p - q) s
            t = jax.nn.one_hot(cache["labels"], logp.shape[-1], dtype=logp.dtype)
            q = (1 - e) * t + e / logp.shape[-1] if e else t
            return _masked(cache, p - q) * s
        q = cache["q"]
        return _masked(cache, p * jnp.sum(q, axis=-1, keepdims=True) - q) * s

    def backward_target(cache, dvalue=1.0):
        logp = cache["logp"]
        return -(1 - e) * _masked(cache, logp) * _scaled(cache, dvalue)

    return Loss(forward, backward, name, backward_target)


def sigmoid_binary_cross_entropy(reduction: str = "batch") -> Loss:
    r"""Binary cross-entropy of sigmoid(logits) against targets in [0, 1].

    logits z, target t: (N, ...)::

        J  = (1/D) sum [ -t log s(z) - (1 - t) log(1 - s(z)) ]
           = (1/D) sum [ softplus(z) - t z ],   softplus(z) = logaddexp(z, 0)
        dz = (s(z) - t) / D * dJ,               dt = -z / D * dJ      (N, ...)

    D = N for ``reduction="batch"`` (default: summed over outputs, mean over
    the batch, the design notes' J), D = N * prod(...) for ``"mean"`` (the
    element mean of PyTorch/optax), D = 1 for ``"sum"``.

    Stable for |z| = 1000: no log of a rounded-to-zero sigmoid is taken.
    Concrete targets outside [0, 1] are a ``ValueError`` (J would be
    unbounded below).
    """
    name = "sigmoid_binary_cross_entropy"
    _check_reduction(name, reduction)

    def forward(logits, target):
        _check_pair(name, logits, target)
        if is_concrete(target):
            tt = np.asarray(target)
            if np.any((tt < 0) | (tt > 1)):
                raise ValueError(f"{name}: targets must lie in [0, 1], got values in "
                                 f"[{np.nanmin(tt):.4g}, {np.nanmax(tt):.4g}]")
        t = jnp.asarray(target).astype(logits.dtype)
        # softplus(z) = logaddexp(z, 0): stable for |z| = 1000, and its autodiff reference is exact
        # at z = 0 (max(z, 0) + log1p(e^-|z|) differentiates to 0 there instead of 1/2)
        sp = jnp.logaddexp(logits, jnp.zeros((), logits.dtype))
        d = _denominator(reduction, logits.shape)
        total = jnp.sum(sp - t * logits)
        return (total if reduction == "sum" else total / d), {"z": logits, "t": t}

    def backward(cache, dvalue=1.0):
        z, t = cache["z"], cache["t"]
        return (jax.nn.sigmoid(z) - t) * _scale(name, dvalue, _denominator(reduction, z.shape), z.dtype)

    def backward_target(cache, dvalue=1.0):
        z = cache["z"]
        return -z * _scale(name, dvalue, _denominator(reduction, z.shape), z.dtype)

    return Loss(forward, backward, name, backward_target)

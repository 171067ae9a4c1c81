r"""Losses. Each J is the mean over the batch axis (N = pred.shape[0]).

A loss is ``forward(pred, target) -> (J, cache)`` and
``backward(cache, dJ=1.0) -> dpred``; ``dJ`` scales the result (chain rule
for a loss used inside a larger cost).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Loss, check_float, is_concrete


def _check_pair(name, pred, target, *, same_shape=True):
    check_float(name, pred, "prediction")
    if np.ndim(pred) < 1:
        raise ValueError(f"{name}: predictions need a batch axis, got shape {np.shape(pred)}")
    if np.shape(target)[:1] != np.shape(pred)[:1]:
        raise ValueError(f"{name}: batch size of targets {np.shape(target)} differs from "
                         f"predictions {np.shape(pred)}")
    if same_shape and np.shape(target) != np.shape(pred):
        raise ValueError(f"{name}: expected target of shape {np.shape(pred)} (same as predictions), "
                         f"got {np.shape(target)}")


def _scale(dvalue, n, dtype):
    return jnp.asarray(dvalue, dtype) / n


def mse() -> Loss:
    r"""Squared error, summed over outputs, mean over the batch.

    pred, target: (N, ...)::

        J     = (1/N) sum_n sum_j (pred_nj - target_nj)^2
        dpred = (2/N) (pred - target) * dJ
        dtarget = -dpred
    """
    name = "mse"

    def forward(pred, target):
        _check_pair(name, pred, target)
        check_float(name, target, "target")
        r = pred - target
        n = pred.shape[0]
        return jnp.sum(r * r) / n, {"r": r}

    def backward(cache, dvalue=1.0):
        r = cache["r"]
        return 2 * _scale(dvalue, r.shape[0], r.dtype) * r

    def backward_target(cache, dvalue=1.0):
        return -backward(cache, dvalue)

    return Loss(forward, backward, name, backward_target)


def softmax_cross_entropy(label_smoothing: float = 0.0) -> Loss:
    r"""Cross-entropy of softmax(logits) against labels or probabilities.

    logits z: (N, C); target: integer labels (N,) in [0, C), or probabilities
    (N, C). With smoothing e the target becomes q = (1 - e) t + e / C
    (t = onehot(labels) or the given probabilities)::

        log p = z - logsumexp(z)                  (stable: max-shifted)
        J     = -(1/N) sum_n sum_c q_nc log p_nc
        dz    = (p * sum_c q - q) / N * dJ        = (softmax(z) - q) / N  when sum_c q = 1

    The fused form never forms 1/p, so |z| = 1000 gives finite values and
    gradients. For probability targets, dtarget = -(1 - e) log p / N * dJ.

    Integer labels: sum_c q = (1 - e) + e = 1 exactly, so the backward is
    ``(p - q) / N * dJ``; the cache holds the labels, not the (N, C) float
    q, which the backward rebuilds (under jit the one-hot fuses into the
    subtraction and is never stored).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"softmax_cross_entropy: label_smoothing must be in [0, 1), got {label_smoothing}")
    e = label_smoothing
    name = "softmax_cross_entropy"

    def forward(logits, target):
        check_float(name, logits, "logits")
        if np.ndim(logits) != 2:
            raise ValueError(f"{name}: expected logits of shape (N, C), got {np.shape(logits)}")
        n, c = logits.shape
        labels = jnp.issubdtype(jnp.result_type(target), jnp.integer)
        if labels:
            if np.shape(target) != (n,):
                raise ValueError(f"{name}: expected integer labels of shape ({n},) for logits "
                                 f"{logits.shape}, got {np.shape(target)}")
            if is_concrete(target):
                t = np.asarray(target)
                if t.size and (t.min() < 0 or t.max() >= c):
                    raise ValueError(f"{name}: labels must lie in [0, {c}) for logits {logits.shape}, "
                                     f"got values in [{t.min()}, {t.max()}]")
            t = jax.nn.one_hot(target, c, dtype=logits.dtype)
        else:
            _check_pair(name, logits, target)
            t = target.astype(logits.dtype)
        q = (1 - e) * t + e / c if e else t
        logp = jax.nn.log_softmax(logits, axis=-1)
        value = -jnp.sum(q * logp) / n
        if labels:
            return value, {"logp": logp, "labels": target}
        return value, {"logp": logp, "q": q}

    def backward(cache, dvalue=1.0):
        logp = cache["logp"]
        p = jnp.exp(logp)
        s = _scale(dvalue, logp.shape[0], logp.dtype)
        if "labels" in cache:                   # sum_c q = 1: dz = (p - q) s
            t = jax.nn.one_hot(cache["labels"], logp.shape[-1], dtype=logp.dtype)
            q = (1 - e) * t + e / logp.shape[-1] if e else t
            return (p - q) * s
        q = cache["q"]
        return (p * jnp.sum(q, axis=-1, keepdims=True) - q) * s

    def backward_target(cache, dvalue=1.0):
        logp = cache["logp"]
        return -(1 - e) * logp * _scale(dvalue, logp.shape[0], logp.dtype)

    return Loss(forward, backward, name, backward_target)


def sigmoid_binary_cross_entropy() -> Loss:
    r"""Binary cross-entropy of sigmoid(logits) against targets in [0, 1].

    logits z, target t: (N, ...)::

        J  = (1/N) sum [ -t log s(z) - (1 - t) log(1 - s(z)) ]
           = (1/N) sum [ softplus(z) - t z ],   softplus(z) = logaddexp(z, 0)
        dz = (s(z) - t) / N * dJ,               dt = -z / N * dJ

    Stable for |z| = 1000: no log of a rounded-to-zero sigmoid is taken.
    """
    name = "sigmoid_binary_cross_entropy"

    def forward(logits, target):
        _check_pair(name, logits, target)
        t = jnp.asarray(target).astype(logits.dtype)
        # softplus(z) = logaddexp(z, 0): stable for |z| = 1000, and its autodiff reference is exact
        # at z = 0 (max(z, 0) + log1p(e^-|z|) differentiates to 0 there instead of 1/2)
        sp = jnp.logaddexp(logits, jnp.zeros((), logits.dtype))
        return jnp.sum(sp - t * logits) / logits.shape[0], {"z": logits, "t": t}

    def backward(cache, dvalue=1.0):
        z, t = cache["z"], cache["t"]
        return (jax.nn.sigmoid(z) - t) * _scale(dvalue, z.shape[0], z.dtype)

    def backward_target(cache, dvalue=1.0):
        z = cache["z"]
        return -z * _scale(dvalue, z.shape[0], z.dtype)

    return Loss(forward, backward, name, backward_target)

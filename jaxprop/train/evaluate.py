"""Evaluation: mean loss and accuracy over a whole set, in evaluation mode (``train=False``).

Accuracy counts predicted positions: for outputs (N, C) and labels (N,) it is
correct / N; for sequence outputs (N, T, C) with labels (N, T) it is
correct / (N T) -- one prediction per position, so it never exceeds 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import Layer, Loss, call_forward


def predicted_labels(pred) -> jax.Array:
    """The class at each position of ``pred`` (N, ..., C): ``argmax`` over the
    last axis, or for one column (a sigmoid logit) class 1 where it is > 0.
    Shape (N, ...)."""
    if pred.shape[-1] == 1:
        return pred[..., 0] > 0
    return jnp.argmax(pred, axis=-1)


def count_correct(pred, labels):
    """``(correct, positions)``: how many of the ``labels.size`` positions
    :func:`predicted_labels` gets right. ``labels`` (N, ...) must have the
    shape of ``pred`` without its last axis."""
    if tuple(np.shape(labels)) != tuple(pred.shape[:-1]):
        raise ValueError(f"accuracy: labels of shape {tuple(np.shape(labels))} do not match predictions "
                         f"{tuple(pred.shape)}; expected labels of shape {tuple(pred.shape[:-1])}")
    guess = predicted_labels(pred).astype(labels.dtype)
    return jnp.sum(guess == labels), int(np.size(labels))


def accuracy(pred, labels) -> jax.Array:
    """Correct predictions / predicted positions (a scalar in [0, 1])."""
    correct, positions = count_correct(pred, labels)
    return correct / positions


def make_eval_fn(net: Layer, loss: Loss):
    """Jitted ``(params, state, x, t, labels) -> {"loss_sum", "correct"}`` in
    evaluation mode (``train=False``): the loss times the N examples of
    ``x``, and the correct positions (``labels=None`` skips accuracy)."""

    def ev(params, state, x, t, labels):
        pred, _ = call_forward(net, params, x, train=False, state=state)
        value, _ = loss.forward(pred, t)
        out = {"loss_sum": value * x.shape[0]}
        if labels is not None:
            out["correct"] = count_correct(pred, labels)[0]
        return out

    return jax.jit(ev)


def evaluate(eval_fn, params, state, x, t, labels=None, batch_size: int = 1000) -> dict:
    """Mean loss (and accuracy when ``labels`` is given) over all of ``x``, in
    chunks of ``batch_size`` (at most two compiled shapes). The loss is the
    mean over examples of the loss of each chunk; the accuracy, correct
    positions over ``labels.size``."""
    n = x.shape[0]
    loss_sum, correct = 0.0, 0
    for i in range(0, n, batch_size):
        if n <= batch_size:                # no slicing: one op less to dispatch (and compile)
            out = eval_fn(params, state, x, t, labels)
        else:
            out = eval_fn(params, state, x[i:i + batch_size], t[i:i + batch_size],
                          None if labels is None else labels[i:i + batch_size])
        loss_sum += float(out["loss_sum"])
        if labels is not None:
            correct += int(out["correct"])
    res = {"loss": loss_sum / n}
    if labels is not None:
        res["accuracy"] = correct / int(np.size(labels))
    return res

"""The identity of a :func:`jaxprop.train.fit` run: what must not change for
``resume=True`` to continue it.

A checkpoint stores it (``meta["run"]``, and its SHA-256 as
``meta["run_fingerprint"]``); resuming with different arguments is refused
with a :class:`~jaxprop.train.errors.ResumeMismatch` naming what differs:

==============  ==============================================================
``net``         the net's name (layers, widths, activations) and its params'
                tree structure and shapes
``loss``        the loss's name
``data``        a digest of the data set's arrays (training and evaluation)
``steps``       the run's length
``dtype``       the run's floating-point type
``grad``        ``"hand"``, ``"autodiff"`` or the custom function's name
``optimizer``   the optimizer's *behaviour*: the sizes (sum of absolute values,
                per leaf) of its first three updates from the run's initial
                params for a fixed probe gradient. An optax optimizer keeps its
                learning rate and settings inside closures, so this is how a
                different learning rate, schedule or optimizer is told apart;
                compared with a relative tolerance of 1e-4, so a change of
                jax version that reorders a sum does not refuse a resume.
==============  ==============================================================

The seed, batch size and epoch length are checked separately (``meta``).
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprop import checkpoint as ckpt
from jaxprop.core import is_floating
from jaxprop.train.errors import ResumeMismatch

PROBE_STEPS = 3
RTOL = 1e-4


@functools.lru_cache(maxsize=32)
def _probe(tx, treedef, shapes):
    """Jitted ``params -> [[sum |update| per leaf] per step]`` (one compile per optimizer and shape)."""

    def grads_like(params):
        def one(j, p):
            if not is_floating(p):
                return jnp.zeros_like(p)
            phase = jnp.arange(p.size, dtype=jnp.float32) * 0.37 + j
            return jnp.cos(phase).reshape(p.shape).astype(p.dtype)
        leaves = jax.tree_util.tree_leaves(params)
        return jax.tree_util.tree_unflatten(treedef, [one(j, p) for j, p in enumerate(leaves)])

    def run(params):
        grads, state, out = grads_like(params), tx.init(params), []
        for k in range(PROBE_STEPS):
            g = jax.tree_util.tree_map(lambda a: a * (1.0 + 0.5 * k), grads)
            updates, state = tx.update(g, state, params)
            params = optax.apply_updates(params, updates)
            out.append([jnp.sum(jnp.abs(u).astype(jnp.float32)) for u in jax.tree_util.tree_leaves(updates)])
        return out

    return jax.jit(run)


def optimizer_probe(tx: optax.GradientTransformation, params) -> list:
    """The sizes of ``tx``'s first updates from ``params`` (see the module docstring)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    shapes = tuple((tuple(np.shape(a)), str(getattr(a, "dtype", None) or np.asarray(a).dtype)) for a in leaves)
    try:
        fn = _probe(tx, treedef, shapes)
    except TypeError:                     # an unhashable optimizer: compile without the cache
        fn = _probe.__wrapped__(tx, treedef, shapes)
    return [[float(v) for v in row] for row in fn(params)]


def data_digest(data) -> str:
    """A digest of a data set's arrays (inputs and targets, training and evaluation)."""
    arrays = [data.x_train, data.y_train, data.x_test, data.y_test]
    stream = getattr(data, "stream", None)
    if stream is not None:
        arrays.append(stream)
    return ckpt.digest(arrays)


def _grad_name(grad: Union[str, Callable]) -> str:
    return grad if isinstance(grad, str) else getattr(grad, "__qualname__", type(grad).__name__)


def run_identity(net, tx, data, plan, grad, params) -> dict:
    """The identity (a JSON-able dict) of a run of ``net`` with optimizer ``tx``
    on ``data`` under ``plan``, from its freshly initialised ``params``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    layout = str(treedef) + "".join(f"{tuple(np.shape(a))}" for a in leaves)
    return {"net": net.name, "params": hashlib.sha256(layout.encode()).hexdigest()[:16],
            "loss": plan.spec.name, "data": f"{data.name}:{data_digest(data)}", "steps": int(plan.total),
            "dtype": plan.dtype.name, "grad": _grad_name(grad), "optimizer": optimizer_probe(tx, params)}


def fingerprint(identity: dict) -> str:
    """SHA-256 (16 hex digits) of an identity, the optimizer sizes to 4 significant digits."""
    ident = dict(identity, optimizer=[[float(f"{v:.4g}") if math.isfinite(v) else str(v) for v in row]
                                      for row in identity.get("optimizer", [])])
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


_WHAT = {"net": "the network", "params": "the parameters' structure or shapes", "loss": "the loss",
         "data": "the data set", "steps": "the number of steps", "dtype": "the dtype",
         "grad": "the gradient function", "optimizer": "the optimizer (its kind, learning rate, schedule "
                                                       "or settings)"}


def _same_sizes(a, b) -> bool:
    if len(a) != len(b) or any(len(x) != len(y) for x, y in zip(a, b)):
        return False
    return all(math.isclose(u, v, rel_tol=RTOL, abs_tol=1e-30) or (math.isnan(u) and math.isnan(v))
               for x, y in zip(a, b) for u, v in zip(x, y))


def differences(saved: dict, current: dict) -> list:
    """What differs between a checkpoint's identity and this run's, in words."""
    out = []
    for key in _WHAT:
        if key not in saved or key not in current:
            continue
        a, b = saved[key], current[key]
        same = _same_sizes(a, b) if key == "optimizer" else a == b
        if not same:
            shown = "" if key in ("optimizer", "params") else f" ({a} there, {b} here)"
            out.append(_WHAT[key] + shown)
    return out


def check(saved: Any, current: dict, path: str) -> None:
    """Raise :class:`ResumeMismatch` when ``saved`` (a checkpoint's identity,
    or None for checkpoints written before identities existed) differs."""
    if not isinstance(saved, dict):
        return
    diff = differences(saved, current)
    if diff:
        raise ResumeMismatch(f"fit: cannot resume {path}: it was written by a different run: "
                             + "; ".join(diff) + ". Resume with the same arguments, or start a new run "
                             "in another directory")

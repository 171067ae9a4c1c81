"""The checked arguments of one :func:`jaxprop.train.fit` run, and its data on the device."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop.core import is_floating
from jaxprop.data import Dataset
from jaxprop.train import stopping
from jaxprop.train.tasks import LossSpec, loss_spec


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run's arguments say, checked."""

    spec: LossSpec
    dtype: Any
    n: int                      # training examples
    batch_size: int
    steps_per_epoch: int
    total: int                  # steps
    eval_every: int
    eval_name: str              # "test", or "val" after a validation split
    stopping: Optional[stopping.EarlyStopping]     # metric and mode filled in
    windows: int = 0            # T when the examples are the T-windows of data.stream (text), else 0


def make_plan(data: Dataset, loss, *, dtype, batch_size, steps, epochs, eval_every, resume,
              checkpoint_dir, early_stopping, mesh) -> Plan:
    """Check :func:`fit`'s arguments (ValueError naming the bad one)."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("fit: dtype float64 needs 64-bit mode: call "
                         "jax.config.update('jax_enable_x64', True) before creating arrays")
    if not is_floating(dtype):
        raise ValueError(f"fit: dtype must be a floating-point type, got {dtype}")
    spec = loss_spec(loss, data)
    n = data.n_train            # rows, or window starts of a token stream
    windows = int(data.context) if data.stream is not None else 0
    if windows and spec.name != "softmax_cross_entropy":
        raise ValueError(f"fit: {data.name} is a token stream; its loss must be softmax_cross_entropy, "
                         f"got {spec.name}")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"fit: batch_size must be an int in [1, {n}] (the training set size), got {batch_size!r}")
    spe = n // batch_size
    if mesh is not None:
        from jaxprop import distributed as dist   # distributed imports train's step: import it late
        dist.check_batch(batch_size, mesh)
    if (steps is None) == (epochs is None):
        raise ValueError("fit: give exactly one of steps= and epochs=")
    total = int(steps) if steps is not None else int(epochs) * spe
    if total < 1:
        raise ValueError(f"fit: the run needs at least one step, got {total}")
    if eval_every is not None and (not isinstance(eval_every, (int, np.integer)) or eval_every < 1):
        raise ValueError(f"fit: eval_every must be an int >= 1 (or None for total // 20), got {eval_every!r}")
    eval_every = int(eval_every or max(1, total // 20))
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir")
    check_labels(data)
    rule = stopping.resolve(early_stopping, data.test_name, bool(data.n_classes))
    return Plan(spec, dtype, n, batch_size, spe, total, eval_every, data.test_name, rule, windows)


def check_labels(data: Dataset):
    """Every label of a classification data set, checked once, eagerly, before
    training: integers in [0, n_classes). Under ``jit`` the loss can only turn an
    out-of-range label into a NaN; here it is a ValueError naming the split."""
    if not data.n_classes:
        return
    splits = [("stream", data.stream)] if data.stream is not None else []
    splits += [("y_train", data.y_train), ("y_test", data.y_test)]
    for what, y in splits:
        if y is None:
            continue
        y = np.asarray(y)
        if y.size == 0:
            continue
        if not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"fit: {data.name}.{what} must hold integer class labels, got dtype {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= data.n_classes:
            bad = int(np.sum((y < 0) | (y >= data.n_classes)))
            raise ValueError(f"fit: {data.name}.{what} has {bad} label(s) outside [0, {data.n_classes}) "
                             f"(values in [{lo}, {hi}])")


def as_dataset(data) -> Dataset:
    """A :class:`jaxprop.data.Dataset`, or a dict with its fields."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        keys = ("x_train", "y_train", "x_test", "y_test", "n_classes")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ValueError(f"fit: data dict lacks {missing}")
        return Dataset(data.get("name", "data"), *(np.asarray(data[k]) for k in keys[:4]),
                       int(data["n_classes"]))
    raise TypeError(f"fit: data must be a jaxprop.data.Dataset or a dict, got {type(data).__name__}")


def on_device(a, dtype):
    """``a`` as a device array: floating point cast to the run's dtype,
    anything else (labels, integer token ids) unchanged."""
    a = np.asarray(a)
    return jnp.asarray(a, dtype) if is_floating(a) else jnp.asarray(a)


def device_data(data: Dataset, plan: Plan) -> dict:
    """Inputs ``x_*``, loss targets ``t_*`` and labels ``lab_*`` (classification
    only, else None) of the training set (``*_tr``) and the evaluation set (``*_ev``),
    and ``stream_tr``: the token stream whose windows are the training
    examples (None unless ``plan.windows``)."""
    t = plan.spec.targets
    labels = data.n_classes > 0
    return {"x_tr": on_device(data.x_train, plan.dtype), "t_tr": on_device(t(data.y_train), plan.dtype),
            "x_ev": on_device(data.x_test, plan.dtype), "t_ev": on_device(t(data.y_test), plan.dtype),
            "lab_tr": jnp.asarray(data.y_train) if labels else None,
            "lab_ev": jnp.asarray(data.y_test) if labels else None,
            "stream_tr": jnp.asarray(data.stream) if plan.windows else None}

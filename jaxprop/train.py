"""Training with optax: one jitted step, a ``fit`` loop, evaluation, checkpoints.

The step is plain optax around any gradient function with the call shape of
``jax.value_and_grad(cost)``::

    grad_fn = jp.value_and_grad(net, loss)          # hand-written backward passes
    grad_fn = jaxprop.autodiff.value_and_grad(net, loss)   # or: jax.value_and_grad of the same forward
    step = make_train_step(grad_fn, tx, net=net)
    params, opt_state, value = step(params, opt_state, x, y)            # plain net
    params, opt_state, value = step(params, opt_state, x, y, key=k)     # dropout
    params, opt_state, (value, state) = step(params, opt_state, x, y, state=state)  # batch norm

so a hand-written run and an autodiff run differ by one argument.

``fit`` runs epochs of shuffled mini-batches. Randomness comes from one key,
``jax.random.key(seed)``, split into (init, data order, dropout); the batch of
step s is a pure function of s (epoch e = s // steps_per_epoch uses the
permutation drawn from ``fold_in(data_key, e)``, dropout uses
``fold_in(dropout_key, s)``), so the same seed gives the same run bit for bit
on the same machine, and a run resumed from a checkpoint at step s continues
exactly as the uninterrupted run would have. A partial last batch of an
epoch is dropped.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprop import checkpoint as ckpt
from jaxprop import distributed as dist
from jaxprop import losses as losses_mod
from jaxprop.core import Layer, Loss, call_forward, init_state
from jaxprop.data import Dataset
from jaxprop.grad import value_and_grad as hand_value_and_grad


# --------------------------------------------------------------------------- losses for data sets

@dataclasses.dataclass(frozen=True)
class LossSpec:
    """A loss bound to a data set: the loss, the outputs the model needs, and
    how labels become the loss's targets."""

    name: str
    loss: Loss
    n_outputs: int
    targets: Callable[[np.ndarray], np.ndarray]


LOSS_ALIASES = {"ce": "softmax_cross_entropy", "cross_entropy": "softmax_cross_entropy",
                "bce": "sigmoid_binary_cross_entropy", "l2": "mse"}
LOSS_NAMES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse")


def default_loss(data: Dataset) -> str:
    return "softmax_cross_entropy" if data.n_classes else "mse"


@functools.lru_cache(maxsize=None)
def _loss(name: str) -> Loss:
    """One Loss object per name, so compiled steps can be reused across runs."""
    return getattr(losses_mod, name)()


def loss_spec(loss: Union[str, Loss, None], data: Dataset) -> LossSpec:
    """Resolve ``loss`` (a name, a :class:`jaxprop.Loss`, or None for the data
    set's default) for ``data``.

    * ``softmax_cross_entropy`` (``ce``): classification; integer labels; C outputs.
    * ``sigmoid_binary_cross_entropy`` (``bce``): two classes; targets y[:, None]
      as floats; 1 output (class 1 when the logit is > 0).
    * ``mse``: regression targets, or one-hot targets for classification (C outputs).

    A ``Loss`` object is used as is with the data set's labels/targets.
    """
    if isinstance(loss, Loss):
        return LossSpec(loss.name, loss, data.n_outputs, lambda y: y)
    name = LOSS_ALIASES.get(loss, loss) if loss is not None else default_loss(data)
    if name == "softmax_cross_entropy":
        if not data.n_classes:
            raise ValueError(f"loss {name}: needs a classification data set; {data.name} is regression (use mse)")
        return LossSpec(name, _loss(name), data.n_classes, lambda y: y)
    if name == "sigmoid_binary_cross_entropy":
        if data.n_classes != 2:
            raise ValueError(f"loss {name}: needs a two-class data set; {data.name} has "
                             f"{data.n_classes or 'no'} classes")
        return LossSpec(name, _loss(name), 1,
                        lambda y: np.asarray(y, np.float32)[:, None])
    if name == "mse":
        if data.n_classes:
            c = data.n_classes
            return LossSpec(name, _loss(name), c, lambda y: np.eye(c, dtype=np.float32)[np.asarray(y)])
        return LossSpec(name, _loss(name), data.n_outputs, lambda y: y)
    raise ValueError(f"unknown loss {loss!r}; choose one of {list(LOSS_NAMES)} (aliases {sorted(LOSS_ALIASES)})")


# --------------------------------------------------------------------------- small helpers

def params_fingerprint(tree) -> str:
    """SHA-256 (first 16 hex digits) of every leaf's dtype, shape and bytes, in
    pytree order: equal fingerprints mean bit-identical parameters."""
    h = hashlib.sha256()
    for leaf in jax.tree_util.tree_leaves(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{a.dtype.name}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def cast_floating(tree, dtype):
    """Cast the floating-point leaves of ``tree`` to ``dtype`` (others unchanged)."""
    dtype = jnp.dtype(dtype)
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def grad_function(net: Layer, loss: Loss, kind: Union[str, Callable] = "hand"):
    """``"hand"``: :func:`jaxprop.value_and_grad` (the hand-written backward);
    ``"autodiff"``: :func:`jaxprop.autodiff.value_and_grad` (``jax.value_and_grad``
    of the same forward); or a callable ``(net, loss) -> grad_fn``."""
    if callable(kind):
        return kind(net, loss)
    if kind == "hand":
        return hand_value_and_grad(net, loss)
    if kind == "autodiff":
        from jaxprop import autodiff          # the reference path, imported only on request
        return autodiff.value_and_grad(net, loss)
    raise ValueError(f"grad must be 'hand', 'autodiff' or a function (net, loss) -> grad_fn; got {kind!r}")


# --------------------------------------------------------------------------- the step

def make_train_step(grad_fn, tx: optax.GradientTransformation, *, net: Optional[Layer] = None,
                    stateful: Optional[bool] = None, stochastic: Optional[bool] = None,
                    donate: bool = True, jit: bool = True):
    """One optimisation step: gradients, ``tx.update``, ``optax.apply_updates``.

    Args:
      grad_fn: ``(params, x, y, **kw) -> (value, grads)`` -- e.g.
        ``jp.value_and_grad(net, loss)``, ``jaxprop.autodiff.value_and_grad(net, loss)``
        or ``jax.value_and_grad(cost)``. For a stateful net it returns
        ``((value, new_state), grads)`` and takes ``state=``.
      tx: an optax GradientTransformation.
      net: optional; when given, ``stateful``/``stochastic`` default to the net's.
      stateful: pass ``state=`` to grad_fn and return the new state.
      stochastic: pass ``key=`` to grad_fn (dropout).
      donate: donate the old params / optimizer state / model state buffers
        to the update (the caller must not reuse the arrays it passed in).
      jit: return the step jitted (default) or as a plain function (to
        compose inside another jitted function).

    Returns:
      ``step(params, opt_state, x, y, key=None, state=None)`` returning
      ``(params, opt_state, value)``, or ``(params, opt_state, (value, state))``
      for a stateful net -- the same convention as ``jp.value_and_grad``.
    """
    if stateful is None:
        stateful = bool(net is not None and net.stateful)
    if stochastic is None:
        stochastic = bool(net is not None and net.stochastic)

    def step(params, opt_state, x, y, key=None, state=None):
        kwargs = {}
        if stochastic:
            if key is None:
                raise ValueError("train step: the network is stochastic (e.g. dropout); pass key=")
            kwargs["key"] = key
        if stateful:
            if state is None:
                raise ValueError("train step: the network has state (e.g. batch norm); pass state=")
            (value, state), grads = grad_fn(params, x, y, state=state, **kwargs)
        else:
            value, grads = grad_fn(params, x, y, **kwargs)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, ((value, state) if stateful else value)

    if not jit:
        return step
    names = ("params", "opt_state") + (("state",) if stateful else ()) if donate else ()
    return jax.jit(step, donate_argnames=names)


# --------------------------------------------------------------------------- evaluation

def make_eval_fn(net: Layer, loss: Loss):
    """Jitted ``(params, state, x, t, labels) -> {"loss_sum", "correct"}`` in
    evaluation mode (``train=False``). ``labels=None`` skips accuracy; a
    prediction with one column counts as class 1 when it is > 0."""

    def ev(params, state, x, t, labels):
        pred, _ = call_forward(net, params, x, train=False, state=state)
        value, _ = loss.forward(pred, t)
        out = {"loss_sum": value * x.shape[0]}
        if labels is not None:
            guess = (pred[:, 0] > 0).astype(labels.dtype) if pred.shape[-1] == 1 else \
                jnp.argmax(pred, axis=-1).astype(labels.dtype)
            out["correct"] = jnp.sum(guess == labels)
        return out

    return jax.jit(ev)


def evaluate(eval_fn, params, state, x, t, labels=None, batch_size: int = 1000) -> dict:
    """Mean loss (and accuracy when ``labels`` is given) over all of ``x``, in
    chunks of ``batch_size`` (at most two compiled shapes)."""
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
        res["accuracy"] = correct / n
    return res


# --------------------------------------------------------------------------- metrics file

def read_jsonl(path: str) -> list:
    """Rows of a JSONL file; stops at the first incomplete/malformed line
    (a run killed while writing leaves at most one)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return rows


def _write_jsonl_atomic(path: str, rows: list):
    ckpt.atomic_write(path, lambda f: f.writelines(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- fit

@dataclasses.dataclass
class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for
    ``patience`` evaluations. ``metric`` defaults to the evaluation set's
    accuracy (its loss for regression); ``mode`` to max for accuracy, min
    otherwise. Use it with a validation split (``data.validation_split``)."""

    patience: int
    metric: Optional[str] = None
    mode: Optional[str] = None
    min_delta: float = 0.0


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns. ``history`` holds every metrics row of the run
    (including rows written before a resume when a metrics file is used)."""

    params: Any
    model_state: Any
    opt_state: Any
    history: list
    step: int
    total_steps: int
    finished: bool
    stopped_early: bool
    elapsed_s: float
    steps_per_s: float
    params_fingerprint: str
    resumed_from: Optional[int] = None
    best: Optional[dict] = None


class _PlainProgress:
    """Fallback when tqdm is not installed: one line per evaluation."""

    def __init__(self, total, initial, file):
        self.total, self.n, self.file = total, initial, file

    def update(self, k):
        self.n += k

    def set_postfix(self, d):
        print(f"step {self.n}/{self.total} " + " ".join(f"{k}={v}" for k, v in d.items()),
              file=self.file, flush=True)

    def close(self):
        pass


def _progress(total, initial, file, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, initial, file)
    return tqdm(total=total, initial=initial, file=file, desc=desc, unit="step",
                dynamic_ncols=True, mininterval=0.5, leave=True)


def _as_dataset(data) -> Dataset:
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


def _cached(fn, *args):
    """``fn(*args)`` through its lru_cache, or directly for unhashable arguments."""
    try:
        hash(args)
    except TypeError:
        return fn.__wrapped__(*args)
    return fn(*args)


@functools.lru_cache(maxsize=32)
def _build(net, tx, in_shape, dtype_name):
    """Jitted ``k_init -> (params, model_state, opt_state)`` in ``dtype`` (one compile)."""

    def build(k_init):
        _, params = net.init(k_init, in_shape)
        params = cast_floating(params, dtype_name)
        state = cast_floating(init_state(net, in_shape), dtype_name)
        return params, state, tx.init(params)

    return jax.jit(build)


@functools.partial(jax.jit, static_argnums=2)
def _permutation(k_data, epoch, n):
    """The data order of one epoch: a pure function of (data key, epoch)."""
    return jax.random.permutation(jax.random.fold_in(k_data, epoch), n)


@functools.lru_cache(maxsize=32)
def _compiled(net, loss, tx, grad, batch_size, mesh=None):
    """The jitted training step of :func:`fit` (gather the batch, gradient,
    update, accumulate the loss) and its eval function, cached so repeated
    runs of one configuration (seeds, hand vs autodiff) compile once."""
    inner = make_train_step(grad_function(net, loss, grad), tx, net=net, jit=False)

    def fused(params, opt_state, state, loss_acc, x_all, t_all, perm, b, s, k_drop):
        idx = jax.lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
        x, t = jnp.take(x_all, idx, axis=0), jnp.take(t_all, idx, axis=0)
        x, t = dist.constrain_batch((x, t), mesh)      # rows split over "data" (no-op without mesh)
        kwargs = {}
        if net.stochastic:
            kwargs["key"] = jax.random.fold_in(k_drop, s)
        if net.stateful:
            kwargs["state"] = state
        params, opt_state, aux = inner(params, opt_state, x, t, **kwargs)
        value, state = aux if net.stateful else (aux, state)
        return params, opt_state, state, loss_acc + value

    return jax.jit(fused, donate_argnums=(0, 1, 2, 3)), make_eval_fn(net, loss)


def fit(net: Layer, loss: Union[str, Loss, None], tx: optax.GradientTransformation, data, *,
        grad: Union[str, Callable] = "hand", steps: Optional[int] = None, epochs: Optional[int] = None,
        batch_size: int = 100, seed: int = 0, eval_every: Optional[int] = None,
        eval_batch_size: int = 1000, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
        keep_checkpoints: int = 2, resume: bool = False, metrics_path: Optional[str] = None,
        early_stopping: Union[int, EarlyStopping, None] = None, dtype="float32",
        progress: bool = True, progress_file=None, desc: str = "train", mesh=None,
        callback: Optional[Callable[[dict, Any], None]] = None) -> FitResult:
    """Train ``net`` on ``data`` with the optimizer ``tx``.

    Args:
      net, loss, tx: the model, the loss (name, Loss, or None for the data
        set's default, see :func:`loss_spec`) and an optax optimizer.
      data: a :class:`jaxprop.data.Dataset` (or a dict with its fields).
      grad: ``"hand"`` (default), ``"autodiff"`` or ``(net, loss) -> grad_fn``.
      steps / epochs: the run's length (exactly one of them).
      batch_size: mini-batch size B; an epoch is ``N // B`` steps.
      seed: the run's seed (initialisation, data order, dropout).
      eval_every: evaluate (train and eval set: loss, accuracy) every this
        many steps, at step 0 and at the end (default: total // 20).
      checkpoint_dir / checkpoint_every: save params, optimizer state, model
        state, PRNG key, step and data-order position atomically every N
        steps and at the end (see :mod:`jaxprop.checkpoint`).
      resume: continue from the latest checkpoint in ``checkpoint_dir``
        (from scratch if there is none). Without it, an existing checkpoint
        or a non-empty metrics file is an error: a run never overwrites
        what another one saved.
      metrics_path: append one JSON row per evaluation, as produced.
      early_stopping: patience (evaluations) or an :class:`EarlyStopping`.
      dtype: ``"float32"`` (default) or ``"float64"`` (needs jax_enable_x64);
        params, inputs and float targets are cast to it.
      progress: show a progress bar (tqdm, else one line per evaluation).
      callback: ``callback(row, params)`` after each evaluation (e.g. to keep
        parameter snapshots: copy them, the next step donates their buffers).
      mesh: data parallelism (:mod:`jaxprop.distributed`): params, optimizer
        state and data set replicated on the mesh, each batch split over its
        ``"data"`` axis; ``batch_size`` must divide by that axis' size.

    Returns a :class:`FitResult`. On a finished run, ``resume=True`` returns
    the saved state and writes nothing.
    """
    data = _as_dataset(data)
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        raise ValueError("fit: dtype float64 needs 64-bit mode: call "
                         "jax.config.update('jax_enable_x64', True) before creating arrays")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"fit: dtype must be a floating-point type, got {dtype}")
    spec = loss_spec(loss, data)
    n = len(data.y_train)
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"fit: batch_size must be an int in [1, {n}] (the training set size), got {batch_size!r}")
    spe = n // batch_size
    if mesh is not None:
        dist.check_batch(batch_size, mesh)
    if (steps is None) == (epochs is None):
        raise ValueError("fit: give exactly one of steps= and epochs=")
    total = int(steps) if steps is not None else int(epochs) * spe
    if total < 1:
        raise ValueError(f"fit: the run needs at least one step, got {total}")
    eval_every = int(eval_every) if eval_every else max(1, total // 20)
    if resume and checkpoint_dir is None:
        raise ValueError("fit: resume=True needs checkpoint_dir")
    if isinstance(early_stopping, int):
        early_stopping = EarlyStopping(patience=early_stopping)
    ev_name = data.test_name
    if early_stopping is not None:
        metric = early_stopping.metric or (f"{ev_name}_accuracy" if data.n_classes else f"{ev_name}_loss")
        mode = early_stopping.mode or ("max" if metric.endswith("accuracy") else "min")
        if mode not in ("max", "min"):
            raise ValueError(f"EarlyStopping: mode must be 'max' or 'min', got {mode!r}")

    # ---- build: keys, params, optimizer, data on device
    root = jax.random.key(seed)
    k_init, k_data, k_drop = jax.random.split(root, 3)
    in_shape = (batch_size,) + data.input_shape
    params, model_state, opt_state = _cached(_build, net, tx, in_shape, dtype.name)(k_init)

    def targets(y):
        t = np.asarray(spec.targets(y))
        return jnp.asarray(t, dtype) if np.issubdtype(t.dtype, np.floating) else jnp.asarray(t)

    x_tr, t_tr = jnp.asarray(data.x_train, dtype), targets(data.y_train)
    x_ev, t_ev = jnp.asarray(data.x_test, dtype), targets(data.y_test)
    lab_tr = jnp.asarray(data.y_train) if data.n_classes else None
    lab_ev = jnp.asarray(data.y_test) if data.n_classes else None

    # ---- resume / refuse to overwrite
    step, elapsed_before, resumed_from = 0, 0.0, None
    loss_acc, acc_count = jnp.zeros((), dtype), 0
    es = {"best": None, "best_step": None, "bad": 0, "stopped": False}
    latest = ckpt.latest(checkpoint_dir) if checkpoint_dir else None
    if latest and not resume:
        raise ValueError(f"fit: {checkpoint_dir} already holds checkpoints; pass resume=True to "
                         "continue that run, or choose another directory")
    if latest:
        key_data = jax.random.key_data(root)
        trees, header = ckpt.restore(latest, {"params": params, "opt_state": opt_state,
                                              "model_state": model_state, "key": key_data,
                                              "loss_acc": loss_acc})
        meta = header["meta"]
        for k, v in (("batch_size", batch_size), ("n_train", n), ("steps_per_epoch", spe)):
            if meta.get(k) != v:
                raise ValueError(f"fit: cannot resume {latest}: it was written with {k}={meta.get(k)}, "
                                 f"this run has {k}={v}")
        if not np.array_equal(np.asarray(trees["key"]), np.asarray(key_data)):
            raise ValueError(f"fit: cannot resume {latest}: it was written with seed {meta.get('seed')}, "
                             f"this run has seed {seed}")
        params, opt_state = trees["params"], trees["opt_state"]
        model_state = trees["model_state"]
        loss_acc, acc_count = jnp.asarray(trees["loss_acc"]), int(meta["loss_acc_count"])
        step, elapsed_before = int(header["step"]), float(meta["elapsed_s"])
        es = dict(meta["early_stopping"])
        resumed_from = step
        params, opt_state, model_state = jax.tree_util.tree_map(jnp.asarray, (params, opt_state, model_state))

    if mesh is not None:                # replicated on every device of the mesh
        (params, opt_state, model_state, loss_acc, x_tr, t_tr, x_ev, t_ev, lab_tr, lab_ev) = dist.replicate(
            (params, opt_state, model_state, loss_acc, x_tr, t_tr, x_ev, t_ev, lab_tr, lab_ev), mesh)

    rows = []
    if metrics_path:
        os.makedirs(os.path.dirname(os.path.abspath(metrics_path)), exist_ok=True)
        content = ""
        if os.path.exists(metrics_path):
            with open(metrics_path, "r", encoding="utf-8") as f:
                content = f.read()
        if content and not resume:
            raise ValueError(f"fit: {metrics_path} is not empty; pass resume=True or choose another path")
        rows = [r for r in read_jsonl(metrics_path) if r.get("step", -1) <= step] if latest else []
        if content != "".join(json.dumps(r) + "\n" for r in rows):
            _write_jsonl_atomic(metrics_path, rows)        # drop rows written after the checkpoint

    finished = es["stopped"] or step >= total
    if finished:
        return FitResult(params, model_state, opt_state, rows, step, total, True, bool(es["stopped"]),
                         elapsed_before, step / elapsed_before if elapsed_before else float("nan"),
                         params_fingerprint(params), resumed_from, _best(es))

    fused, eval_fn = _cached(_compiled, net, spec.loss, tx, grad, batch_size, mesh)

    mfile = open(metrics_path, "a", encoding="utf-8") if metrics_path else None
    bar = _progress(total, step, progress_file or sys.stderr, desc) if progress else None
    t0 = time.perf_counter()
    last = {"step": step, "time": t0}

    def record():
        nonlocal loss_acc, acc_count
        now = time.perf_counter()
        row = {"step": step, "epoch": step / spe,
               "batch_loss": float(loss_acc) / acc_count if acc_count else None}
        tr = evaluate(eval_fn, params, model_state, x_tr, t_tr, lab_tr, eval_batch_size)
        ev = evaluate(eval_fn, params, model_state, x_ev, t_ev, lab_ev, eval_batch_size)
        for prefix, res in (("train", tr), (ev_name, ev)):
            for k, v in res.items():
                row[f"{prefix}_{k}"] = v
        row["elapsed_s"] = elapsed_before + (now - t0)
        row["steps_per_s"] = (step - last["step"]) / (now - last["time"]) if step > last["step"] else None
        last.update(step=step, time=now)
        loss_acc, acc_count = jnp.zeros((), dtype), 0
        rows.append(row)
        if mfile:
            mfile.write(json.dumps(row) + "\n")
            mfile.flush()
        if bar is not None:
            post = {"loss": f"{row['train_loss']:.4g}"}
            if f"{ev_name}_accuracy" in row:
                post[f"{ev_name}_acc"] = f"{row[f'{ev_name}_accuracy']:.4f}"
            else:
                post[f"{ev_name}_loss"] = f"{row[f'{ev_name}_loss']:.4g}"
            if row["steps_per_s"]:
                post["steps/s"] = f"{row['steps_per_s']:.0f}"
            bar.set_postfix(post)
        if callback is not None:
            callback(row, params)
        return row

    def early_stop_check(row):
        if early_stopping is None:
            return
        v = row.get(metric)
        if v is None:
            raise ValueError(f"EarlyStopping: metric {metric!r} is not in the metrics {sorted(row)}")
        better = es["best"] is None or (v > es["best"] + early_stopping.min_delta if mode == "max"
                                        else v < es["best"] - early_stopping.min_delta)
        if better:
            es.update(best=v, best_step=row["step"], bad=0)
        else:
            es["bad"] += 1
            if es["bad"] >= early_stopping.patience:
                es["stopped"] = True

    def save():
        ep, b = divmod(step, spe)
        meta = {"seed": seed, "batch_size": batch_size, "n_train": n, "steps_per_epoch": spe,
                "epoch": ep, "batch_in_epoch": b, "total_steps": total, "dtype": dtype.name,
                "finished": bool(es["stopped"] or step >= total),
                "elapsed_s": elapsed_before + (time.perf_counter() - t0),
                "loss_acc_count": acc_count, "early_stopping": es,
                "params_fingerprint": params_fingerprint(params)}
        ckpt.save(checkpoint_dir, step, {"params": params, "opt_state": opt_state,
                                         "model_state": model_state,
                                         "key": jax.random.key_data(root), "loss_acc": loss_acc},
                  meta, keep=keep_checkpoints)

    try:
        if step == 0 and not rows:
            early_stop_check(record())
        perm, perm_epoch = None, None
        while step < total and not es["stopped"]:
            epoch, b = divmod(step, spe)
            if epoch != perm_epoch:
                perm, perm_epoch = _permutation(k_data, epoch, n), epoch
            params, opt_state, model_state, loss_acc = fused(
                params, opt_state, model_state, loss_acc, x_tr, t_tr, perm, b, step, k_drop)
            acc_count += 1
            step += 1
            if bar is not None:
                bar.update(1)
            if step % eval_every == 0 or step == total:
                early_stop_check(record())
            if checkpoint_dir and ((checkpoint_every and step % checkpoint_every == 0)
                                   or step == total or es["stopped"]):
                save()
    finally:
        if bar is not None:
            bar.close()
        if mfile:
            mfile.close()

    elapsed = elapsed_before + (time.perf_counter() - t0)
    return FitResult(params, model_state, opt_state, rows, step, total, True, bool(es["stopped"]),
                     elapsed, step / elapsed, params_fingerprint(params), resumed_from, _best(es))


def _best(es) -> Optional[dict]:
    if es.get("best") is None:
        return None
    return {"value": es["best"], "step": es["best_step"]}

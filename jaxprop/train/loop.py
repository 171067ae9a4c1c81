"""``fit``: epochs of shuffled mini-batches, evaluation, early stopping, checkpoints, resume.

Randomness comes from one key, ``jax.random.key(seed)``, split into (init,
data order, dropout); the batch of step s is a pure function of s (epoch
e = s // steps_per_epoch uses the permutation drawn from
``fold_in(data_key, e)``, dropout uses ``fold_in(dropout_key, s)``), so the
same seed gives the same run bit for bit on the same machine, and a run
resumed from a checkpoint at step s continues exactly as the uninterrupted
run would have. A partial last batch of an epoch is dropped. For a token
stream (text, ``data.stream``) the examples are its T-windows, one per
start position: an epoch visits every start once, in the order drawn the
same way.

A run: check the arguments (:mod:`~jaxprop.train.plan`), build the
training state or restore it from the latest checkpoint
(:mod:`~jaxprop.train.state`), then steps of the compiled fused step
(:mod:`~jaxprop.train.fused`), with an evaluation row every ``eval_every``
steps and a checkpoint every ``checkpoint_every``.

Failures stop the run with the last good checkpoint kept (see
:mod:`~jaxprop.train.errors`): a NaN or infinite batch loss raises
:class:`NonFiniteLoss` naming its step (the fused step records the first
such step on the device; the loop reads it every :data:`STEPS_IN_FLIGHT`
steps, at each evaluation and before each checkpoint, so a diverged state
is never saved), and Ctrl-C raises :class:`Interrupted` with the step
reached.

Steps in flight. JAX dispatches steps asynchronously; the loop waits for
the latest step every :data:`STEPS_IN_FLIGHT` steps, so at most that many
are queued. On emulated CPU devices (``--xla_force_host_platform_device_count``)
an unbounded queue deadlocks: XLA:CPU gives its client thread pool just
one thread per device when there are more devices than cores, each
multi-device launch holds pool threads while it waits for a device's slot
in its bounded queue of in-flight computations (32), and a collective
(the gradient all-reduce) needs every device's thread at once -- the run
aborted with "Termination timeout for 'all reduce' ... only 7 of them
arrived" when more than 32 steps ran between two waits.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from jaxprop import checkpoint as ckpt
from jaxprop.core import Layer, Loss
from jaxprop.train import fused, identity as identity_mod, state as state_mod, stopping
from jaxprop.train.errors import Interrupted, NonFiniteLoss
from jaxprop.train.evaluate import evaluate
from jaxprop.train.metrics import MetricsFile, params_fingerprint, prepare_metrics_file, progress_bar, \
    progress_postfix, restart_clock
from jaxprop.train.plan import Plan, as_dataset, device_data, make_plan
from jaxprop.train.state import TrainState
from jaxprop.train.stopping import EarlyStopping

#: The loop waits for the latest step after every this many (see the module docstring).
STEPS_IN_FLIGHT = 16


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


def _result(st: TrainState, plan: Plan, rows: list, elapsed: float) -> FitResult:
    return FitResult(st.params, st.model_state, st.opt_state, rows, st.step, plan.total, True,
                     bool(st.early_stopping["stopped"]), elapsed, st.step / elapsed if elapsed else math.nan,
                     params_fingerprint(st.params), st.resumed_from, stopping.best(st.early_stopping))


def _evaluation_row(st: TrainState, plan: Plan, arrays: dict, eval_fn, eval_batch_size: int) -> dict:
    """``step``, ``epoch``, ``batch_loss`` (mean since the last row), then loss
    and accuracy on the training set (``train_*``) and the evaluation set."""
    row = {"step": st.step, "epoch": st.step / plan.steps_per_epoch,
           "batch_loss": float(st.loss_acc) / st.acc_count if st.acc_count else None}
    for prefix, end in (("train", "tr"), (plan.eval_name, "ev")):
        res = evaluate(eval_fn, st.params, st.model_state, arrays[f"x_{end}"], arrays[f"t_{end}"],
                       arrays[f"lab_{end}"], eval_batch_size)
        row.update({f"{prefix}_{k}": v for k, v in res.items()})
    return row


def fit(net: Layer, loss: Union[str, Loss, None], tx: optax.GradientTransformation, data, *,
        grad: Union[str, Callable] = "hand", steps: Optional[int] = None, epochs: Optional[int] = None,
        batch_size: int = 100, seed: int = 0, eval_every: Optional[int] = None,
        eval_batch_size: int = 1000, checkpoint_dir: Optional[str] = None, checkpoint_every: int = 0,
        keep_checkpoints: int = 2, resume: bool = False, metrics_path: Optional[str] = None,
        early_stopping: Union[int, EarlyStopping, None] = None, dtype="float32",
        progress: bool = True, progress_file=None, desc: str = "train", mesh=None,
        callback: Optional[Callable[[dict, Any], None]] = None, stop_on_nonfinite: bool = True) -> FitResult:
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
        Accuracy is correct predictions over predicted positions.
      checkpoint_dir / checkpoint_every: save params, optimizer state, model
        state, PRNG key, step and data-order position atomically every N
        steps and at the end (see :mod:`jaxprop.checkpoint`).
      resume: continue from the latest usable checkpoint in ``checkpoint_dir``
        (from scratch if there is none; an error if there are checkpoints
        but none is usable). The checkpoint must come from the same run:
        other arguments (data, net, loss, optimizer or learning rate,
        steps, seed, batch size, dtype) raise a ``ResumeMismatch`` naming
        what differs (:mod:`jaxprop.train.identity`). Without it, an
        existing checkpoint or a non-empty metrics file is an error: a run
        never overwrites what another one saved.
      metrics_path: append one JSON row per evaluation, as produced.
      early_stopping: patience (evaluations) or an :class:`EarlyStopping`.
      dtype: ``"float32"`` (default) or ``"float64"`` (needs jax_enable_x64);
        params, floating-point inputs and float targets are cast to it;
        integer inputs (token ids) and labels are left as they are.
      progress: show a progress bar (tqdm, else one line per evaluation).
      callback: ``callback(row, params)`` after each evaluation (e.g. to keep
        parameter snapshots: copy them, the next step donates their buffers).
      mesh: data parallelism (:mod:`jaxprop.distributed`): params, optimizer
        state and data set replicated on the mesh, each batch split over its
        ``"data"`` axis; ``batch_size`` must divide by that axis' size.
      stop_on_nonfinite: raise :class:`NonFiniteLoss` at the first NaN or
        infinite batch loss (default); False trains on (to study divergence;
        checkpoints of a non-finite state are still refused).

    Returns a :class:`FitResult`. On a finished run, ``resume=True`` returns
    the saved state and writes nothing. Raises :class:`NonFiniteLoss` when
    the loss diverges and :class:`Interrupted` on Ctrl-C, both naming the
    step and keeping the last checkpoint.
    """
    data = as_dataset(data)
    plan = make_plan(data, loss, dtype=dtype, batch_size=batch_size, steps=steps, epochs=epochs,
                     eval_every=eval_every, resume=resume, checkpoint_dir=checkpoint_dir,
                     early_stopping=early_stopping, mesh=mesh)

    # ---- keys, a fresh state (or the latest checkpoint's), data on the device
    root = jax.random.key(seed)
    k_init, k_data, k_drop = jax.random.split(root, 3)
    in_shape = (batch_size,) + data.input_shape
    params, model_state, opt_state = fused.cached(fused.initial, net, tx, in_shape, plan.dtype.name)(k_init)
    st = TrainState(params, opt_state, model_state, jnp.zeros((), plan.dtype))
    arrays = device_data(data, plan)
    ident = identity_mod.run_identity(net, tx, data, plan, grad, params) if checkpoint_dir else None
    if checkpoint_dir and ckpt.list_steps(checkpoint_dir) and not resume:
        raise ValueError(f"fit: {checkpoint_dir} already holds checkpoints; pass resume=True to "
                         "continue that run, or choose another directory")
    latest = None
    if checkpoint_dir and resume:
        restored, latest = state_mod.restore_latest(st, checkpoint_dir, root, plan, seed, ident)
        st = restored or st
    st.bad = jnp.asarray(-1, jnp.int32)
    if mesh is not None:                # replicated on every device of the mesh
        from jaxprop import distributed as dist   # distributed imports train's step: import it late
        st.params, st.opt_state, st.model_state, st.loss_acc, st.bad, arrays = dist.replicate(
            (st.params, st.opt_state, st.model_state, st.loss_acc, st.bad, arrays), mesh)
    rows = prepare_metrics_file(metrics_path, resume=resume, step=st.step if latest else None) \
        if metrics_path else []
    if st.finished(plan):
        return _result(st, plan, rows, st.elapsed_before)

    # ---- the loop
    step_fn, eval_fn = fused.cached(fused.compiled, net, plan.spec.loss, tx, grad, batch_size, mesh,
                                    plan.windows)
    src = (arrays["stream_tr"],) * 2 if plan.windows else (arrays["x_tr"], arrays["t_tr"])
    mfile = MetricsFile(metrics_path)
    bar = progress_bar(plan.total, st.step, progress_file or sys.stderr, desc) if progress else None
    t0 = time.perf_counter()
    last = {"step": st.step, "time": t0}
    first = st.step

    def kept() -> Optional[str]:
        """The newest checkpoint on disk (what a resume continues from)."""
        steps = ckpt.list_steps(checkpoint_dir) if checkpoint_dir else []
        return ckpt.path_for(checkpoint_dir, steps[-1]) if steps else None

    def wait_and_check():
        """Wait for the latest step (bounds the steps in flight) and stop at a non-finite loss."""
        s = int(st.bad)
        if s >= 0 and stop_on_nonfinite:
            path = kept()
            raise NonFiniteLoss(
                f"fit: the training loss became NaN or infinite at step {s + 1} (the batch loss of update "
                f"{s + 1} of {plan.total}); stopped. Lower the learning rate, or look for NaN/inf in the data. "
                + (f"The last good checkpoint is kept: {path}" if path else "No checkpoint was written yet"),
                s + 1, path)

    def save():
        wait_and_check()
        try:
            state_mod.save(st, plan, root, seed, st.elapsed_before + (time.perf_counter() - t0),
                           checkpoint_dir, keep_checkpoints, ident)
        except NonFiniteLoss as e:
            path = kept()
            raise NonFiniteLoss(f"{e}; stopped without saving it. "
                                + (f"The last good checkpoint is kept: {path}" if path else
                                   "No checkpoint was written yet"), e.step, path) from None

    def record():
        wait_and_check()
        now = time.perf_counter()
        row = _evaluation_row(st, plan, arrays, eval_fn, eval_batch_size)
        row["elapsed_s"] = st.elapsed_before + (now - t0)
        row["steps_per_s"] = (st.step - last["step"]) / (now - last["time"]) if st.step > last["step"] else None
        last.update(step=st.step, time=now)
        st.loss_acc, st.acc_count = jnp.zeros((), plan.dtype), 0
        rows.append(row)
        mfile.append(row)
        if bar is not None:
            bar.set_postfix(progress_postfix(row, plan.eval_name))
        if callback is not None:
            callback(row, st.params)
        stopping.update(st.early_stopping, plan.stopping, row)

    try:
        if st.step == 0 and not rows:
            record()
        perm, perm_epoch = None, None
        while not st.finished(plan):
            epoch, b = divmod(st.step, plan.steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = fused.permutation(k_data, epoch, plan.n), epoch
            st.params, st.opt_state, st.model_state, st.loss_acc, st.bad = step_fn(
                st.params, st.opt_state, st.model_state, st.loss_acc, st.bad, *src, perm, b, st.step, k_drop)
            st.acc_count += 1
            st.step += 1
            if bar is not None:
                if st.step == first + 1:
                    restart_clock(bar)      # the first step compiled: the ETA counts from here
                bar.update(1)
            if st.step % STEPS_IN_FLIGHT == 0:
                wait_and_check()
            if st.step % plan.eval_every == 0 or st.step == plan.total:
                record()
            if checkpoint_dir and ((checkpoint_every and st.step % checkpoint_every == 0) or st.finished(plan)):
                save()
    except KeyboardInterrupt:
        raise Interrupted(st.step, kept()) from None
    finally:
        if bar is not None:
            bar.close()
        mfile.close()
    return _result(st, plan, rows, st.elapsed_before + (time.perf_counter() - t0))

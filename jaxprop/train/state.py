"""The training state of a :func:`jaxprop.train.fit` run, and its checkpoints.

A checkpoint is trusted only after it proves itself: its arrays match the
digests in its header (:mod:`jaxprop.checkpoint`), its params and optimizer
state match the fingerprints :func:`save` stored, and every floating-point
array in them is finite (a run never saves a diverged state). A checkpoint
that fails is skipped, with a :class:`~jaxprop.checkpoint.RecoveryWarning`
that says so, in favour of the one before it (:func:`restore_latest`); when
none is usable, resuming is refused rather than silently starting again
from step 0. A checkpoint of a *different run* (other seed, batch size,
data, net, loss, optimizer, steps) is an error, not a fallback.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop import checkpoint as ckpt
from jaxprop.core import is_floating
from jaxprop.train import identity as identity_mod, stopping
from jaxprop.train.errors import NonFiniteLoss, ResumeMismatch
from jaxprop.train.metrics import params_fingerprint
from jaxprop.train.plan import Plan


@dataclasses.dataclass
class TrainState:
    """Everything a checkpoint holds: arrays, the step, the early-stopping record."""

    params: Any
    opt_state: Any
    model_state: Any
    loss_acc: Any                # sum of the batch losses since the last evaluation ...
    acc_count: int = 0           # ... over this many steps
    step: int = 0
    elapsed_before: float = 0.0  # seconds spent before a resume
    resumed_from: Optional[int] = None
    early_stopping: dict = dataclasses.field(default_factory=stopping.initial_record)
    bad: Any = None              # int32 on the device: first step with a non-finite loss, or -1 (not saved)

    def trees(self, root) -> dict:
        """The arrays a checkpoint stores (``root``: the run's PRNG key)."""
        return {"params": self.params, "opt_state": self.opt_state, "model_state": self.model_state,
                "key": jax.random.key_data(root), "loss_acc": self.loss_acc}

    def finished(self, plan: Plan) -> bool:
        return bool(self.early_stopping["stopped"]) or self.step >= plan.total


def nonfinite_leaves(tree) -> list:
    """Paths of the floating-point leaves of ``tree`` that hold a NaN or an infinity."""
    return [jax.tree_util.keystr(path) for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]
            if is_floating(a) and not bool(np.all(np.isfinite(np.asarray(a))))]


def _verify(path: str, trees: dict, meta: dict) -> None:
    """Raise :class:`~jaxprop.checkpoint.CorruptCheckpoint` when the arrays do
    not match the fingerprints :func:`save` stored, or are not finite."""
    for group, key in (("params", "params_fingerprint"), ("opt_state", "opt_state_fingerprint"),
                       ("model_state", "model_state_fingerprint")):
        if key in meta and params_fingerprint(trees[group]) != meta[key]:
            raise ckpt.CorruptCheckpoint(
                f"checkpoint {path}: its {group} do not match the {key} in its header "
                f"({params_fingerprint(trees[group])}, expected {meta[key]}): the arrays were changed")
    for group in ("params", "opt_state", "model_state"):
        bad = nonfinite_leaves(trees[group])
        if bad:
            raise ckpt.CorruptCheckpoint(f"checkpoint {path}: {group}{bad[0]} holds NaN or infinite values "
                                         f"({len(bad)} array(s) in all)")


def restore(template: TrainState, path: str, root, plan: Plan, seed: int,
            identity: Optional[dict] = None) -> TrainState:
    """The state saved in checkpoint ``path``, checked against this run's
    arguments (:class:`ResumeMismatch`) and against itself
    (:class:`~jaxprop.checkpoint.CorruptCheckpoint`)."""
    key_data = jax.random.key_data(root)
    trees, header = ckpt.restore(path, template.trees(root))
    meta = header["meta"]
    _verify(path, trees, meta)
    for k, v in (("batch_size", plan.batch_size), ("n_train", plan.n), ("steps_per_epoch", plan.steps_per_epoch)):
        if meta.get(k) != v:
            raise ResumeMismatch(f"fit: cannot resume {path}: it was written with {k}={meta.get(k)}, "
                                 f"this run has {k}={v}")
    if not np.array_equal(np.asarray(trees["key"]), np.asarray(key_data)):
        raise ResumeMismatch(f"fit: cannot resume {path}: it was written with seed {meta.get('seed')}, "
                             f"this run has seed {seed}")
    if identity is not None:
        identity_mod.check(meta.get("run"), identity, path)
    params, opt_state, model_state = jax.tree_util.tree_map(
        jnp.asarray, (trees["params"], trees["opt_state"], trees["model_state"]))
    step = int(header["step"])
    return TrainState(params, opt_state, model_state, jnp.asarray(trees["loss_acc"]),
                      int(meta["loss_acc_count"]), step, float(meta["elapsed_s"]), step,
                      dict(meta["early_stopping"]))


def restore_latest(template: TrainState, directory: str, root, plan: Plan, seed: int,
                   identity: Optional[dict] = None) -> Tuple[Optional[TrainState], Optional[str]]:
    """``(state, path)`` of the newest usable checkpoint in ``directory``, or
    ``(None, None)`` when it holds none. An unusable one (unreadable, changed
    after it was written, not finite) is skipped with a RecoveryWarning naming
    it and the one used instead; when every one is unusable, a ValueError
    (never a silent restart from step 0)."""
    steps = ckpt.list_steps(directory)
    problems = []
    for step in reversed(steps):
        path = ckpt.path_for(directory, step)
        try:
            st = restore(template, path, root, plan, seed, identity)
        except ckpt.CorruptCheckpoint as e:
            problems.append(str(e))
            continue
        if problems:
            warnings.warn(f"{'; '.join(problems)}; resuming from {path} (step {step}) instead",
                          ckpt.RecoveryWarning, stacklevel=3)
        return st, path
    if problems:
        raise ValueError(f"fit: cannot resume from {directory}: none of its {len(steps)} checkpoint(s) is "
                         "usable: " + "; ".join(problems) + ". Move the folder away to start the run again")
    return None, None


def save(st: TrainState, plan: Plan, root, seed: int, elapsed: float, directory: str, keep: int,
         identity: Optional[dict] = None) -> str:
    """Write ``st`` atomically as the checkpoint of its step (see :mod:`jaxprop.checkpoint`),
    with the fingerprints :func:`restore` verifies and the run's identity.
    Raises :class:`~jaxprop.train.errors.NonFiniteLoss` instead of saving
    params or optimizer state that hold NaN or infinite values."""
    host = jax.tree_util.tree_map(np.asarray, st.trees(root))
    bad = nonfinite_leaves({"params": host["params"], "opt_state": host["opt_state"]})
    if bad:
        raise NonFiniteLoss(f"fit: after step {st.step} the training state holds NaN or infinite values "
                            f"(first: {bad[0]})", st.step)
    epoch, b = divmod(st.step, plan.steps_per_epoch)
    meta = {"seed": seed, "batch_size": plan.batch_size, "n_train": plan.n,
            "steps_per_epoch": plan.steps_per_epoch, "epoch": epoch, "batch_in_epoch": b,
            "total_steps": plan.total, "dtype": plan.dtype.name, "finished": st.finished(plan),
            "elapsed_s": elapsed, "loss_acc_count": st.acc_count, "early_stopping": st.early_stopping,
            "params_fingerprint": params_fingerprint(host["params"]),
            "opt_state_fingerprint": params_fingerprint(host["opt_state"]),
            "model_state_fingerprint": params_fingerprint(host["model_state"])}
    if identity is not None:
        meta.update(run=identity, run_fingerprint=identity_mod.fingerprint(identity))
    return ckpt.save(directory, st.step, host, meta, keep=keep)

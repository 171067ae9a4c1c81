"""The runner's numbers, checked before anything is written: a bad value is a
:class:`UsageError` that names the option, what it must be and what it got.

Full batch is explicit: ``--batch-size N`` with N the training set's size
(an explicit batch larger than the set is an error; a per-data-set default
larger than a small set is the set's size).
"""
from __future__ import annotations

import math


class UsageError(Exception):
    """A command line that cannot run (exit status 2)."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _require(cfg: dict, name: str, ok, must: str):
    v = cfg.get(name)
    if v is not None and not ok(v):
        raise UsageError(f"{_flag(name)} must be {must}, got {v!r}")


def check_options(cfg: dict) -> None:
    """The options whose valid range does not depend on the data set."""
    _require(cfg, "lr", lambda v: math.isfinite(v) and v > 0, "a positive number (the peak learning rate)")
    for name in ("steps", "epochs", "eval_every", "keep_checkpoints", "early_stopping", "devices",
                 "num_processes"):
        _require(cfg, name, lambda v: v >= 1, "at least 1")
    _require(cfg, "batch_size", lambda v: v >= 1,
             "at least 1 (for full batch give the training set's size)")
    _require(cfg, "checkpoint_every", lambda v: v >= 0, "0 (only at the end) or more")
    _require(cfg, "warmup_steps", lambda v: v >= 0, "0 or more")
    _require(cfg, "val_fraction", lambda v: 0 <= v < 1, "in [0, 1)")


def check_resolved(cfg: dict, n_train: int, explicit_batch: bool) -> None:
    """The options checked against the data set and each other, once resolved."""
    check_options(cfg)
    if explicit_batch and cfg["batch_size"] > n_train:
        raise UsageError(f"--batch-size {cfg['batch_size']} is larger than the training set ({n_train} "
                         f"examples); use --batch-size {n_train} for full batch")
    if cfg["steps"] < 1:
        raise UsageError(f"the run has {cfg['steps']} steps (--epochs {cfg.get('epochs')} of "
                         f"{n_train} // {cfg['batch_size']} steps); it needs at least 1")
    if cfg.get("schedule") == "warmup_cosine" and (cfg.get("warmup_steps") or 0) > cfg["steps"]:
        raise UsageError(f"--warmup-steps {cfg['warmup_steps']} is more than the run's {cfg['steps']} steps")

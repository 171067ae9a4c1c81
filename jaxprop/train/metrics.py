"""What a run reports: its metrics file (one JSON row per evaluation), the
parameters' fingerprint, and the progress bar.

Every JSON a run writes is strict JSON (``allow_nan=False``): a non-finite
number (a diverged loss) is written as ``null`` and its key listed under
``"nonfinite"`` (:func:`json_safe`).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import List, Optional, Tuple

import jax

from jaxprop import checkpoint as ckpt


def params_fingerprint(tree) -> str:
    """SHA-256 (first 16 hex digits) of every leaf's dtype, shape and bytes, in
    pytree order: equal fingerprints mean bit-identical parameters (the
    digest :mod:`jaxprop.checkpoint` stores per group)."""
    return ckpt.digest(jax.tree_util.tree_leaves(tree))


# --------------------------------------------------------------------------- strict JSON

def _clean(obj, path: str, bad: list):
    if isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
        return None
    if isinstance(obj, dict):
        return {k: _clean(v, f"{path}.{k}" if path else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v, f"{path}[{i}]", bad) for i, v in enumerate(obj)]
    return obj


def json_safe(obj) -> Tuple[object, List[str]]:
    """``(clean, nonfinite)``: ``obj`` with every NaN or infinity replaced by
    None, and the keys (dotted paths) where that happened."""
    bad: list = []
    return _clean(obj, "", bad), bad


def flagged(row: dict) -> dict:
    """A flat row (metrics, summary) as strict JSON: non-finite values become
    None and their keys are listed under ``"nonfinite"``."""
    clean, bad = json_safe(row)
    if bad:
        clean["nonfinite"] = sorted(set(clean.get("nonfinite") or []) | set(bad))
    return clean


def dumps(obj, **kw) -> str:
    """``json.dumps`` that refuses NaN and infinity (strict JSON)."""
    return json.dumps(obj, allow_nan=False, **kw)


# --------------------------------------------------------------------------- the metrics file

def read_jsonl(path: str) -> list:
    """Rows of a JSONL file. A last line without its newline (a run killed
    while writing it) is dropped; a malformed line elsewhere is skipped with
    a :class:`~jaxprop.checkpoint.RecoveryWarning` naming the file and the
    line, and the rows after it are kept."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path, "r", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row, why = None, str(e)
            else:
                why = None if isinstance(row, dict) else f"a {type(row).__name__}, not an object"
            if why is not None:
                warnings.warn(f"{path}, line {number}: not a metrics row ({why}); skipping that line",
                              ckpt.RecoveryWarning, stacklevel=2)
                continue
            rows.append(row)
    return rows


def _jsonl(rows: list) -> str:
    return "".join(dumps(flagged(r)) + "\n" for r in rows)


def prepare_metrics_file(path: str, *, resume: bool, step: Optional[int]) -> List[dict]:
    """Make ``path`` ready for a run that continues at ``step`` and return the rows it keeps.

    A non-empty file is an error unless ``resume``: a run never appends to
    another run's metrics. Resuming from a checkpoint at ``step`` keeps the
    rows up to that step and drops any written after it (the checkpoint's run
    will write them again); ``step=None`` (no checkpoint) starts empty. The
    file is rewritten, atomically, only when that changes it.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    content = ""
    if os.path.exists(path):
        with open(path, "r", encoding="utf-8") as f:
            content = f.read()
    if content and not resume:
        raise ValueError(f"fit: {path} is not empty; pass resume=True or choose another path")
    rows = [r for r in read_jsonl(path) if isinstance(r.get("step"), int) and r["step"] <= step] \
        if step is not None else []
    if content != _jsonl(rows):
        ckpt.atomic_write(path, lambda f: f.write(_jsonl(rows)))
    return rows


class MetricsFile:
    """Appends one JSON row per evaluation to ``path`` as it is produced
    (nothing when ``path`` is None): one ``write`` of one whole line, so a
    kill leaves at most a torn last line, which :func:`read_jsonl` drops.
    Strict JSON (see :func:`flagged`); an ``OSError`` names the file."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._f = None
        if path:
            try:
                self._f = open(path, "a", encoding="utf-8")
            except OSError as e:
                if e.errno is not None:
                    e.filename = e.filename or path
                raise

    def append(self, row: dict):
        if self._f:
            try:
                self._f.write(dumps(flagged(row)) + "\n")
                self._f.flush()
            except OSError as e:
                if e.errno is not None:
                    e.filename = e.filename or self.path
                raise

    def close(self):
        if self._f:
            self._f.close()


# --------------------------------------------------------------------------- the progress bar

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


def progress_bar(total: int, initial: int, file, desc: str):
    """A tqdm bar over the run's steps (one printed line per evaluation without tqdm).
    Its rate and ETA are the average since :func:`restart_clock` (``smoothing=0``)."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, initial, file)
    return tqdm(total=total, initial=initial, file=file, desc=desc, unit="step",
                dynamic_ncols=True, mininterval=0.5, leave=True, smoothing=0)


def restart_clock(bar) -> None:
    """Count the bar's rate and ETA from now on: called once the first step
    has compiled, so the compile time does not enter the ETA."""
    if hasattr(bar, "start_t") and hasattr(bar, "_time"):      # tqdm
        bar.start_t = bar.last_print_t = bar._time()
        bar.initial = bar.last_print_n = bar.n


def _fmt(v, spec: str) -> str:
    return "none" if v is None else format(v, spec)


def progress_postfix(row: dict, eval_name: str) -> dict:
    """What the bar shows after an evaluation: train loss, eval accuracy (or loss), speed."""
    post = {"loss": _fmt(row["train_loss"], ".4g")}
    if f"{eval_name}_accuracy" in row:
        post[f"{eval_name}_acc"] = _fmt(row[f"{eval_name}_accuracy"], ".4f")
    else:
        post[f"{eval_name}_loss"] = _fmt(row[f"{eval_name}_loss"], ".4g")
    if row["steps_per_s"]:
        post["steps/s"] = f"{row['steps_per_s']:.0f}"
    return post

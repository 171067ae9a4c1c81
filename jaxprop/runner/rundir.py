"""The run folder of ``jaxprop-train``: where each file goes, how it is written, config.json,
summary.json and the closing report; the folder's lock.

Every file is written atomically (temp file, fsync, rename; 0644 like any new
file) except metrics.jsonl, which grows one whole line per write. JSON is
strict: a NaN or infinite number is written as null and its key listed under
``"nonfinite"``. A run holds an exclusive lock on ``OUT/.lock``
(``fcntl.flock``) from before it looks at the folder until it ends, so a
second runner on the same folder stops with an error instead of mixing two
runs' files; the kernel releases the lock when the process dies, even by
SIGKILL.
"""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import sys
import time
from typing import Optional

import jax
import numpy as np

from jaxprop import checkpoint as ckpt
from jaxprop.train.metrics import dumps, flagged

LOCK_NAME = ".lock"


class FolderInUse(Exception):
    """Another process holds the run folder's lock."""


class RunLock:
    """An exclusive ``fcntl.flock`` on ``folder/.lock``, held until :meth:`release`
    (or the process ends). The file holds the holder's pid while it is held."""

    def __init__(self, folder: str):
        import fcntl                        # POSIX; the runner's lock is advisory and local
        self.path = os.path.join(folder, LOCK_NAME)
        os.makedirs(folder, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 64).decode("ascii", "replace").strip()
            os.close(self._fd)
            self._fd = None
            raise FolderInUse(f"{folder} is in use by another run{f' (pid {holder})' if holder else ''}: "
                              f"it holds {self.path}. Wait for it to finish, or choose another --out") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self):
        if self._fd is not None:
            import fcntl
            try:
                os.ftruncate(self._fd, 0)    # no stale pid once released
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def check_not_in_use(folder: str) -> None:
    """Raise :class:`FolderInUse` when another process holds ``folder``'s lock (takes nothing)."""
    path = os.path.join(folder, LOCK_NAME)
    if os.path.exists(path):
        RunLock(folder).release()           # raises FolderInUse when held


def is_empty(folder: str) -> bool:
    """True when ``folder`` holds nothing but its lock file (or does not exist)."""
    return not os.path.isdir(folder) or not [n for n in os.listdir(folder) if n != LOCK_NAME]


def read_json(path: str, what: str = "") -> dict:
    """A JSON object from ``path``; a missing, unreadable, truncated or non-object
    file is a ValueError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{what}{path} is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}{path} is not valid JSON (truncated or damaged?): {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{what}{path} holds a {type(obj).__name__}, not a JSON object")
    return obj


def entry_point() -> list:
    """How the runner was started, for config.json's ``command``: ``python
    experiments/train.py``, ``python -m jaxprop.cli`` or ``jaxprop-train``."""
    arg0 = sys.argv[0] if sys.argv else ""
    base = os.path.basename(arg0)
    if base == "train.py":
        return ["python", arg0]
    if base in ("cli.py", "__main__.py") and "jaxprop" in arg0:
        return ["python", "-m", "jaxprop.cli"]
    return ["jaxprop-train"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def default_out(cfg: dict) -> str:
    """``runs/train/<dataset>-<model>-<grad>-seed<seed>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "train", f"{_slug(cfg['dataset'])}-{_slug(cfg['model'] or 'default')}-"
                                         f"{cfg['grad']}-seed{cfg['seed']}-{stamp}")


def paths(out: str) -> dict:
    """The files of the run folder ``out``."""
    return {"config": os.path.join(out, "config.json"), "metrics": os.path.join(out, "metrics.jsonl"),
            "summary": os.path.join(out, "summary.json"), "curves": os.path.join(out, "learning_curves.png"),
            "checkpoints": os.path.join(out, "checkpoints")}


def write_json_atomic(path: str, obj):
    """``obj`` as indented, key-sorted strict JSON (see :func:`jaxprop.train.metrics.flagged`),
    written atomically."""
    text = dumps(flagged(obj) if isinstance(obj, dict) else obj, indent=2, sort_keys=True) + "\n"

    def write(f):
        f.write(text)
    ckpt.atomic_write(path, write)


def _device() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def summarize(result, cfg: dict, eval_name: str) -> dict:
    """The run's summary.json content from a :class:`jaxprop.train.FitResult`."""
    from jaxprop import __version__
    rows = result.history
    last = rows[-1] if rows else {}

    def best(key):
        vals = [(r[key], r["step"]) for r in rows if r.get(key) is not None and math.isfinite(r[key])]
        return max(vals, key=lambda v: (v[0], -v[1])) if vals else (None, None)

    summary = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "stopped_early": result.stopped_early,
        "final_train_loss": last.get("train_loss"),
        "final_train_accuracy": last.get("train_accuracy"),
        f"final_{eval_name}_loss": last.get(f"{eval_name}_loss"),
        f"final_{eval_name}_accuracy": last.get(f"{eval_name}_accuracy"),
        f"best_{eval_name}_accuracy": best(f"{eval_name}_accuracy")[0],
        f"best_{eval_name}_step": best(f"{eval_name}_accuracy")[1],
        "wall_time_s": result.elapsed_s,
        "steps_per_s": result.steps_per_s,
        "device": _device(),
        "params_fingerprint": result.params_fingerprint,
        "n_params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(result.params))),
        "eval_set": eval_name,
        "dataset": cfg["dataset"], "model": cfg["model"], "grad": cfg["grad"], "seed": cfg["seed"],
        "dtype": cfg["dtype"], "jaxprop_version": __version__, "jax_version": jax.__version__,
    }
    if eval_name != "test":            # keep the documented keys present
        summary.update(final_test_accuracy=None, best_test_accuracy=None)
    return summary


def config_record(options: dict, cfg: dict, spec, net, ds, argv) -> dict:
    """config.json: the options as given and resolved, the loss, net and data set, the versions."""
    return {"options": {k: v for k, v in options.items() if k not in ("resume",)},
            "resolved": {k: v for k, v in cfg.items() if k not in ("resume", "progress")},
            "loss": spec.name, "n_outputs": spec.n_outputs, "net": net.name,
            "dataset": {"name": ds.name, "n_train": int(ds.n_train), "n_eval": int(len(ds.y_test)),
                        "eval_set": ds.test_name, "input_shape": list(ds.input_shape),
                        "n_classes": ds.n_classes, "normalisation": ds.normalisation},
            "command": shlex.join(entry_point() + list(argv)),
            "versions": {"jax": jax.__version__, "python": sys.version.split()[0]}}


def report(summary: dict, files: dict, curves: Optional[str], ev: str):
    """The closing lines on stderr: steps, speed, final accuracy or loss, fingerprint, files."""
    def num(v, spec):
        return "none" if v is None else format(v, spec)

    acc = summary.get(f"final_{ev}_accuracy")
    msg = f"final {ev} accuracy {acc:.4f} (best {num(summary[f'best_{ev}_accuracy'], '.4f')})" \
        if acc is not None else f"final {ev} loss {num(summary[f'final_{ev}_loss'], '.4g')}"
    print(f"jaxprop-train: {summary['steps']} steps in {summary['wall_time_s']:.1f} s "
          f"({summary['steps_per_s']:.0f} steps/s); {msg}; params {summary['params_fingerprint']}",
          file=sys.stderr)
    print(f"  {files['config']}\n  {files['metrics']}\n  {files['summary']}\n"
          + (f"  {curves}\n" if curves else "  (no learning_curves.png: install matplotlib, "
             "pip install 'jaxprop[experiments]')\n")
          + f"  {files['checkpoints']}{os.sep}", file=sys.stderr)

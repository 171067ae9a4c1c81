"""Bits per character of a trained text run, by position in the scoring window and at other window lengths.

The runner scores a text run's evaluation split in non-overlapping windows of the run's context T,
every position, each window from a zero state. The first characters of a window are predicted with
almost no history, so part of the figure is the windowing, not the model. This script loads a run
folder's latest checkpoint and scores the same split (validation for a ``--val-fraction`` run, else
test) again:

* per window length L (default 128, 256, 512, 1024): the split cut into non-overlapping L-windows
  from its start (the last ``(n - 1) mod L`` targets are left out), every position scored; L = T
  reproduces the runner's figure;
* per position band within the window (0-15, 16-63, 64-127, 128+).

A recurrent model runs on any length; a model with a fixed context (a GPT) is scored at L <= T only::

    python -m experiments.train.bpc_by_position --out runs/sequence/RUN [--lengths 128 256 512 1024]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop import data as data_mod
from jaxprop.core import call_forward
from jaxprop.runner.sample import load_run

BANDS = ((0, 16), (16, 64), (64, 128), (128, None))


def eval_stream(config: dict, context: int, vocab) -> tuple:
    """``(name, ids)``: the evaluation split of the run ``config`` as one id stream (inputs and the
    last target), rebuilt from its data set, context, vocabulary and ``--val-fraction``."""
    opts = config["options"]
    ds = data_mod.load(opts["dataset"], seed=opts.get("data_seed"), context=context, vocab=vocab)
    if opts.get("val_fraction"):
        ds = ds.validation_split(opts["val_fraction"], seed=0)
    x, y = np.asarray(ds.x_test), np.asarray(ds.y_test)
    return ds.test_name, np.append(x.reshape(-1), y[-1, -1])


def position_bits(net, params, stream: np.ndarray, length: int, *, batch: int = 256, precision=None) -> np.ndarray:
    """``(M, length)`` bits of each target of the stream's non-overlapping ``length``-windows."""
    m = (len(stream) - 1) // length
    x = stream[:m * length].reshape(m, length)
    y = stream[1:m * length + 1].reshape(m, length)

    @jax.jit
    def bits(params, xb, yb):
        with precision() if precision else contextlib.nullcontext():
            logits, _ = call_forward(net, params, xb)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, yb[..., None], axis=-1)[..., 0] / jnp.log(2.0)

    out = []
    for i in range(0, m, batch):     # the last batch is padded to the batch size: one compiled program
        xb, yb = x[i:i + batch], y[i:i + batch]
        pad = batch - len(xb)
        xb, yb = (np.concatenate([a, np.zeros((pad, length), a.dtype)]) for a in (xb, yb))
        out.append(np.asarray(bits(params, jnp.asarray(xb), jnp.asarray(yb)))[:batch - pad])
    return np.concatenate(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="a text run's folder")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--json", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    net, params, vocab, context, config = load_run(args.out)
    precision = None
    if config["options"].get("matmul_precision") == "bfloat16":
        precision = lambda: jax.default_matmul_precision("bfloat16")   # noqa: E731  (as the run traced it)
    split, stream = eval_stream(config, context, vocab)
    fixed_context = config["options"]["model"].startswith("gpt")      # position embeddings for T positions
    rows = []
    print(f"{args.out}: {split} split, {len(stream) - 1} targets, run context {context}")
    print(f"| window | {split} bpc, every position | " + " | ".join(
        f"positions {a}-{'' if b is None else b - 1}" for a, b in BANDS) + " |")
    print("|---|---|" + "---|" * len(BANDS))
    for length in args.lengths:
        if fixed_context and length > context:
            print(f"| {length} | (the model's context is {context}) |")
            continue
        b = position_bits(net, params, stream, length, precision=precision)
        bands = [float(b[:, lo:hi].mean()) if b[:, lo:hi].size else None for lo, hi in BANDS]
        rows.append({"length": length, "bpc": float(b.mean()), "n_targets": int(b.size), "bands": bands})
        print(f"| {length} | {b.mean():.4f} | " + " | ".join("" if v is None else f"{v:.3f}" for v in bands) + " |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"run": os.path.basename(os.path.normpath(args.out)), "split": split,
                       "context": context, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

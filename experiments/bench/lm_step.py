"""Training-step time of the runner's text models: how many characters a time budget buys.

One jitted step (the hand-written value_and_grad, then Adam) of each model spec at batch N and
context T, on random ids; the median of ``--repeats`` timed steps after three warm-up steps, and the
characters per second it implies (N T / step time). Used to choose the model of a fixed-wall-time
run (README "Sequence models": the 15-minute Shakespeare run)::

    python -m experiments.bench.lm_step lstm:512:emb=64@32 gru:512:emb=64@64 --matmul-precision bfloat16
    taskset -c 0 python -m experiments.bench.lm_step lstm:512:emb=64@32 --tag one-core

``SPEC@N`` or ``SPEC@N@T`` (T default 128). Results: ``experiments/bench/results/lm_step[-TAG].json``.
Wall-clock figures: compare rows of one run, on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from jaxprop.runner.models import build_model

VOCAB = 79          # the Shakespeare vocabulary's size


def parse_item(item: str) -> tuple:
    parts = item.split("@")
    if len(parts) not in (2, 3):
        raise SystemExit(f"lm_step: expected SPEC@N or SPEC@N@T, got {item!r}")
    return parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else 128


def step_time(spec: str, n: int, t: int, precision: str, repeats: int) -> dict:
    net = build_model(spec, VOCAB, vocab_size=VOCAB, context=t)
    _, params = net.init(jax.random.key(0), (n, t))
    value_and_grad = jp.value_and_grad(net, jp.softmax_cross_entropy())
    opt = optax.adam(1e-3)
    state = opt.init(params)

    def step(params, state, x, y):
        value, grads = value_and_grad(params, x, y)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value

    x = jax.random.randint(jax.random.key(1), (n, t), 0, VOCAB)
    y = jax.random.randint(jax.random.key(2), (n, t), 0, VOCAB)
    scope = jax.default_matmul_precision("bfloat16") if precision == "bfloat16" else contextlib.nullcontext()
    with scope:
        compiled = jax.jit(step).lower(params, state, x, y).compile()
    for _ in range(3):
        params, state, value = compiled(params, state, x, y)
    value.block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        params, state, value = compiled(params, state, x, y)
        value.block_until_ready()
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return {"spec": spec, "batch": n, "context": t, "matmul_precision": precision,
            "ms_per_step": 1e3 * median, "ms_iqr": [1e3 * float(q) for q in np.percentile(times, [25, 75])],
            "kchars_per_s": n * t / median / 1e3,
            "n_params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("items", nargs="+", help="SPEC@N or SPEC@N@T, e.g. lstm:512:emb=64@32")
    ap.add_argument("--matmul-precision", choices=["default", "bfloat16"], default="default")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    rows = []
    print("| model | N | T | matmuls | ms / step [IQR] | k characters / s |")
    print("|---|---|---|---|---|---|")
    for item in args.items:
        row = step_time(*parse_item(item), args.matmul_precision, args.repeats)
        rows.append(row)
        print(f"| {row['spec']} | {row['batch']} | {row['context']} | {row['matmul_precision']} | "
              f"{row['ms_per_step']:.0f} [{row['ms_iqr'][0]:.0f}, {row['ms_iqr'][1]:.0f}] | "
              f"{row['kchars_per_s']:.1f} |", flush=True)
    header = {"jax": jax.__version__, "backend": jax.default_backend(), "machine": platform.machine(),
              "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "load_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "argv": sys.argv[1:]}
    os.makedirs(args.results, exist_ok=True)
    path = os.path.join(args.results, "lm_step" + (f"-{args.tag}" if args.tag else "") + ".json")
    with open(path, "w") as f:
        json.dump({"header": header, "rows": rows}, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

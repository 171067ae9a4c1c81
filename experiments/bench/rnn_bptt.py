"""Step time and memory of hand-written BPTT against jax.grad through the same scan.

The network is the MNIST-1D sequence model: a recurrent layer (last state) then a dense
layer to 10 classes, on a batch of (N, T, 1) sequences (MNIST-1D: T = 40 steps of one
feature). Both training steps (gradient + Adam update, one ``jax.jit``) run on the same
network, batch and parameters; they differ only in the gradient function
(``jp.value_and_grad`` vs ``jaxprop.autodiff.value_and_grad``). After warm-up the two are
timed in pairs, alternating which goes first, and the median of the per-pair ratios
hand / autodiff is reported (pairing cancels drifts in machine load). Memory is XLA's own
account of each compiled step (``jax.jit(step).lower(...).compile().memory_analysis()``):
temporaries (the scan's stacked caches live there) and the total with arguments and outputs.

    python -m experiments.bench.rnn_bptt                        # gru(128), about a minute
    python -m experiments.bench.rnn_bptt --cell lstm --hidden 128
    python -m experiments.bench.rnn_bptt --hidden 512 --batch-size 32 --length 128 --features 64 --tag lm
    python -m experiments.bench.rnn_bptt --cell lstm --hidden 512 --batch-size 32 --length 128 --features 64 \
        --matmul-precision bfloat16 --tag lm-bf16

``--sum-ab`` adds a paired A/B of the two placements of the cell's weight-gradient rule
(``Cell.sum_grads``, ``jaxprop/combinators/scan.py``): summed after the reverse sweep against
inside its loop, both hand-written, reported as ``ratio_sum_after_over_in_loop``; the default
placement (after when N < 64) is what the hand contestant runs.

``--project-ab`` adds a paired A/B of the two placements of the input projection a_t = x_t W_ih + b_ih
(``jaxprop.layers.recurrent.PROJECT_IN_LOOP``): inside the forward loop (the default, what the hand
contestant runs) against for all steps at once before it, both hand-written, reported as
``ratio_project_in_loop_over_before``.

``--matmul-precision bfloat16`` traces every step under ``jax.default_matmul_precision("bfloat16")``
(every matmul of the layers rounds its float32 operands to bfloat16 and sums in float32,
``jaxprop.core.matmul``) and adds a paired A/B of the hand step against the same step in float32,
``ratio_bfloat16_over_float32``.

Writes ``experiments/bench/results/rnn_bptt-<cell><hidden>[-TAG].json`` and prints the figures.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from jaxprop import autodiff
from jaxprop.layers.recurrent import gru, lstm, rnn

scan_module = sys.modules["jaxprop.combinators.scan"]     # the package re-exports the function scan
recurrent_module = sys.modules["jaxprop.layers.recurrent"]

CELLS = {"gru": gru, "lstm": lstm, "rnn": rnn}


def _memory(compiled):
    m = compiled.memory_analysis()
    if m is None:
        return None
    return {"temp_bytes": int(m.temp_size_in_bytes),
            "total_bytes": int(m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes
                               - m.alias_size_in_bytes)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cell", choices=sorted(CELLS), default="gru")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--length", type=int, default=40, help="time steps (MNIST-1D: 40)")
    ap.add_argument("--features", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=60, help="timed (hand, autodiff) pairs")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sum-ab", action="store_true",
                    help="also time the weight-gradient sum after the sweep against in the loop")
    ap.add_argument("--project-ab", action="store_true",
                    help="also time the input projection inside the forward loop against before it")
    ap.add_argument("--matmul-precision", choices=("default", "bfloat16"), default="default",
                    help="bfloat16: every step traced under jax.default_matmul_precision('bfloat16') "
                         "(jaxprop.core.matmul rounds the operands), plus a paired A/B of the hand step "
                         "against itself in float32 (ratio_bfloat16_over_float32)")
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    def build():
        return jp.serial(CELLS[args.cell](args.hidden, return_sequences=False), jp.dense(10))

    net = build()
    loss = jp.softmax_cross_entropy()
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch_size, args.length, args.features)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch_size))
    _, params = net.init(jax.random.key(0), x.shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    opt_state = tx.init(params)

    steps = {"hand": jp.train.make_train_step(jp.value_and_grad(net, loss), tx, donate=False),
             "autodiff": jp.train.make_train_step(autodiff.value_and_grad(net, loss), tx, donate=False)}
    report = {"cell": args.cell, "hidden": args.hidden, "batch": args.batch_size, "length": args.length,
              "features": args.features, "dtype": "float32", "backend": jax.default_backend(),
              "devices": len(jax.devices()), "cpus": os.cpu_count(),
              "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    report["matmul_precision"] = args.matmul_precision
    bf16 = args.matmul_precision == "bfloat16"
    compiled = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        with jax.default_matmul_precision("bfloat16") if bf16 else contextlib.nullcontext():
            compiled[name] = step.lower(params, opt_state, x, y).compile()
        report[f"compile_s_{name}"] = round(time.perf_counter() - t0, 3)
        report[f"memory_{name}"] = _memory(compiled[name])
    if bf16:                               # the hand step as it is without the setting
        step = jp.train.make_train_step(jp.value_and_grad(net, loss), tx, donate=False)
        compiled["hand_float32"] = step.lower(params, opt_state, x, y).compile()

    def variant(module, attr, value, build=lambda: net):
        """The hand step traced with ``module.attr = value`` (a new step function: jit would reuse the
        first trace; ``build`` makes the network again when the setting is read at construction)."""
        default = getattr(module, attr)
        setattr(module, attr, value)
        try:
            step = jp.train.make_train_step(jp.value_and_grad(build(), loss), tx, donate=False)
            with jax.default_matmul_precision("bfloat16") if bf16 else contextlib.nullcontext():
                return step.lower(params, opt_state, x, y).compile()
        finally:
            setattr(module, attr, default)

    if args.sum_ab:                        # the same hand step traced with each placement of sum_grads
        for name, below in (("sum_after", 10 ** 9), ("sum_in_loop", 0)):
            compiled[name] = variant(scan_module, "SUM_AFTER_BELOW_BATCH", below)
            report[f"memory_{name}"] = _memory(compiled[name])
    if args.project_ab:                    # ... and with each placement of the input projection
        for name, inside in (("project_in_loop", True), ("project_before", False)):
            compiled[name] = variant(recurrent_module, "PROJECT_IN_LOOP", inside, build)
            report[f"memory_{name}"] = _memory(compiled[name])

    # same numbers first: the two steps are the same update
    out = {n: c(params, opt_state, x, y) for n, c in compiled.items()}
    if bf16:
        report["value_rel_diff_bfloat16_vs_float32"] = float(abs(out["hand"][2] - out["hand_float32"][2])
                                                             / abs(out["hand_float32"][2]))
    report["value_rel_diff"] = float(abs(out["hand"][2] - out["autodiff"][2]) / abs(out["autodiff"][2]))
    report["param_max_abs_diff_after_1_step"] = max(
        float(jnp.max(jnp.abs(a - b))) for a, b in
        zip(jax.tree_util.tree_leaves(out["hand"][0]), jax.tree_util.tree_leaves(out["autodiff"][0])))

    def timed(name):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled[name](params, opt_state, x, y))
        return time.perf_counter() - t0

    def paired(a, b):
        for _ in range(args.warmup):
            timed(a), timed(b)
        times, ratios = {a: [], b: []}, []
        for i in range(args.pairs):
            order = (a, b) if i % 2 == 0 else (b, a)
            t = {n: timed(n) for n in order}
            for n in t:
                times[n].append(t[n])
            ratios.append(t[a] / t[b])
        q = np.quantile(ratios, [0.25, 0.75])
        return times, round(statistics.median(ratios), 4), [round(float(q[0]), 4), round(float(q[1]), 4)]

    times, report["ratio_hand_over_autodiff_median"], report["ratio_iqr"] = paired("hand", "autodiff")
    if bf16:
        ab_times, report["ratio_bfloat16_over_float32"], report["ratio_bfloat16_over_float32_iqr"] = \
            paired("hand", "hand_float32")
        times["hand_float32"] = ab_times["hand_float32"]
    if args.sum_ab:
        ab_times, report["ratio_sum_after_over_in_loop"], report["ratio_sum_after_over_in_loop_iqr"] = \
            paired("sum_after", "sum_in_loop")
        times.update(ab_times)
    if args.project_ab:
        ab_times, report["ratio_project_in_loop_over_before"], report["ratio_project_in_loop_over_before_iqr"] = \
            paired("project_in_loop", "project_before")
        times.update(ab_times)
    for n, ts in times.items():
        report[f"step_ms_{n}"] = round(1e3 * statistics.median(ts), 3)
    report["pairs"] = args.pairs
    for n in ("hand", "autodiff"):
        m = report[f"memory_{n}"]
        if m:
            report[f"temp_MiB_{n}"] = round(m["temp_bytes"] / 2**20, 3)

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rnn_bptt-{args.cell}{args.hidden}" + (f"-{args.tag}" if args.tag else "") + ".json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

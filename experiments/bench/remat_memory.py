"""Recomputation: a 16-block GPT's training-step memory and time with and without remat.

The same GPT (token and positional embeddings, L pre-LN transformer blocks, final layer norm,
dense head; float32) in two builds that differ only in the block stack:

* ``repeat``       -- ``jp.repeat(block, L)``: the reverse scan reads every block's full cache
                      (attention probabilities, layer-norm statistics, MLP activations);
* ``repeat-remat`` -- ``jp.repeat(block, L, remat=True)``: the scan keeps only each block's input
                      (N, T, D) and the backward re-runs that block's forward before its backward.

Both are ``jp.value_and_grad(net, softmax_cross_entropy())`` jitted, the hand-written sweep.
Memory: XLA's compiled temporary memory of the step
(``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``). Time: after
warm-up, ``--rounds`` rounds of ``--reps`` steps of each build, interleaved one step at a time in a
rotating order; each round gives the ratio of the builds' median step times; reported: the
median ratio over rounds and its interquartile range. The gradients of the two builds are
compared (they differ by rounding only: remat re-runs the same forward).

    python -m experiments.bench.remat_memory                 # ~2 min on 2 cores
    python -m experiments.bench.remat_memory --rounds 15

Writes ``experiments/bench/results/remat_memory.{json,md}``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxprop as jp
from experiments.bench import benchmark as bm

BUILDS = ("repeat-remat", "repeat")
MEMORY_TARGET, TIME_TARGET = 0.4, 1.5      # remat / plain (issue 15)


def gpt(layers, dim, heads, vocab, length, *, remat):
    block = jp.transformer_block(heads)
    return jp.serial(jp.embedding(vocab, dim), jp.positional_embedding(length),
                     jp.repeat(block, layers, remat=remat), jp.layer_norm(), jp.dense(vocab))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=79)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=2, help="steps per build per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    loss = jp.softmax_cross_entropy()
    nets = {b: gpt(args.layers, args.dim, args.heads, args.vocab, args.length, remat=b == "repeat-remat")
            for b in BUILDS}
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(0, args.vocab, (args.batch_size, args.length + 1)), jnp.int32)
    x, y = ids[:, :-1], ids[:, 1:]
    params = jax.jit(lambda k: nets["repeat"].init(k, x.shape)[1])(jax.random.key(0))   # the same for both
    steps = {b: jax.jit(jp.value_and_grad(nets[b], loss)) for b in BUILDS}
    memory = {b: int(steps[b].lower(params, x, y).compile().memory_analysis().temp_size_in_bytes) for b in BUILDS}
    print("temp MB " + ", ".join(f"{b} {v / 1e6:.1f}" for b, v in memory.items()), flush=True)

    (v_r, g_r), (v_p, g_p) = steps["repeat-remat"](params, x, y), steps["repeat"](params, x, y)
    top = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(g_p))
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) / max(float(jnp.max(jnp.abs(b))), 1e-3 * top)
                    for a, b in zip(jax.tree_util.tree_leaves(g_r), jax.tree_util.tree_leaves(g_p)))

    def run(b):
        return bm.timed(steps[b], params, x, y)

    bm.warm_up(run, BUILDS, args.warmup)
    ratios, med = [], {b: [] for b in BUILDS}
    t0 = time.time()
    for i in range(args.rounds):
        t = {b: [] for b in BUILDS}
        for j in range(args.reps):
            o = (i * args.reps + j) % len(BUILDS)
            for b in BUILDS[o:] + BUILDS[:o]:
                t[b].append(run(b))
        for b in BUILDS:
            med[b].append(statistics.median(t[b]))
        ratios.append(statistics.median(t["repeat-remat"]) / statistics.median(t["repeat"]))
    q = statistics.quantiles(ratios, n=4)
    res = {
        "model": f"GPT {args.layers} blocks, D {args.dim}, {args.heads} heads, V {args.vocab}, "
                 f"batch {args.batch_size}, T {args.length}, float32",
        "n_params": int(sum(a.size for a in jax.tree_util.tree_leaves(params))),
        "temp_bytes": memory, "temp_ratio": memory["repeat-remat"] / memory["repeat"],
        "rounds": args.rounds, "reps_per_round": args.reps, "timed_seconds": time.time() - t0,
        "median_step_ms": {b: 1e3 * statistics.median(v) for b, v in med.items()},
        "time_ratio_median": statistics.median(ratios), "time_ratio_iqr": [q[0], q[2]],
        "loss_diff": abs(float(v_r) - float(v_p)), "max_rel_grad_diff_float32": grad_diff,
        "machine": bm.machine(),
    }
    bm.write_results(args.out, "remat_memory", res, report, argv)
    return res


def report(res, command):
    m, mem = res["machine"], res["temp_bytes"]
    r, tr, q = res["temp_ratio"], res["time_ratio_median"], res["time_ratio_iqr"]
    return "\n".join([
        f"# remat: {res['model']} ({res['n_params']:,} params)", "",
        f"{m['backend']} x{m['devices']}, {m['cpus']} cores, load {m['load_avg_1m']:.1f}, jax {m['jax']}; "
        f"`{command}`", "",
        "| build | temporary MB (compiled step) | median step ms |", "|---|---|---|",
        *[f"| `{b}` | {mem[b] / 1e6:.1f} | {res['median_step_ms'][b]:.1f} |" for b in BUILDS], "",
        f"- memory remat / plain: {r:.3f} (target <= {MEMORY_TARGET}: {'met' if r <= MEMORY_TARGET else 'MISSED'})",
        f"- step time remat / plain: median {tr:.3f} [{q[0]:.3f}, {q[1]:.3f}] over {res['rounds']} paired rounds "
        f"(target <= {TIME_TARGET}: {'met' if tr <= TIME_TARGET else 'MISSED'})",
        f"- same numbers: loss difference {res['loss_diff']:.1e}, max relative gradient difference "
        f"{res['max_rel_grad_diff_float32']:.1e} (float32)", ""])


if __name__ == "__main__":
    main()

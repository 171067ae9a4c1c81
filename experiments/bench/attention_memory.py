"""Attention's memory and time: save="lse" and save="probs" against jax.grad of the same forward.

One causal multi-head attention layer (batch 8, D 256, 4 heads, float32), one training step's
gradient: ``jp.value_and_grad(layer, jp.mse())`` for the two hand-written backward passes, and
``jaxprop.autodiff.value_and_grad`` (``jax.value_and_grad`` of the plain ``save="probs"`` forward,
the same forward) as the reference:

* ``lse``      -- blocked online-softmax forward, the backward rebuilds each key block of P from
                  the row log-sum-exp: no (T, T) array (block 128);
* ``probs``    -- caches P (N, H, T, T) and applies dS = P * (dP - rowsum(dO * O));
* ``jax.grad`` -- autodiff of the forward, which stores what its VJP needs (P and more).

Memory: XLA's compiled temporary memory of each jitted step
(``jax.jit(step).lower(...).compile().memory_analysis().temp_size_in_bytes``) at T = 1024 and
2048. Time at T = 1024 (or ``--time-length``): after warm-up, ``--rounds`` rounds of ``--reps``
steps of each variant, interleaved one step at a time in a rotating order; each round gives the
ratio of the variants' median step times; reported: the median ratio over rounds and its
interquartile range (pairing within a round cancels the drift of a shared machine).

    python -m experiments.bench.attention_memory            # ~2-3 min on 2 busy cores
    python -m experiments.bench.attention_memory --rounds 21 --reps 3

Writes ``experiments/bench/results/attention_memory.{json,md}``.
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
from jaxprop import autodiff
from jaxprop.layers.attention import attention

VARIANTS = ("lse", "probs", "jax.grad")
TARGETS = {1024: 0.25, 2048: 0.15}          # lse temp memory / jax.grad's (issue 15)
TIME_TARGET = 1.05


def make_steps(heads, block_size):
    loss = jp.mse()
    layers = {"lse": attention(heads, causal=True, save="lse", block_size=block_size),
              "probs": attention(heads, causal=True, save="probs")}
    vgs = {"lse": jp.value_and_grad(layers["lse"], loss), "probs": jp.value_and_grad(layers["probs"], loss),
           "jax.grad": autodiff.value_and_grad(layers["probs"], loss)}
    return layers["probs"], {k: jax.jit(vgs[k]) for k in VARIANTS}


def inputs(batch, length, dim, layer):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((batch, length, dim)), jnp.float32)
    _, params = layer.init(jax.random.key(0), x.shape)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
    return params, x, y


def quartiles(v):
    q = statistics.quantiles(v, n=4)
    return [q[0], q[2]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--time-length", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--reps", type=int, default=2, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    plain, steps = make_steps(args.heads, args.block_size)
    memory, grad_diff = {}, {}
    for t in args.lengths:
        call = inputs(args.batch_size, t, args.dim, plain)
        memory[t] = {k: int(steps[k].lower(*call).compile().memory_analysis().temp_size_in_bytes)
                     for k in VARIANTS}
        print(f"T={t}: temp MB " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in memory[t].items()), flush=True)

    call = inputs(args.batch_size, args.time_length, args.dim, plain)
    grads = {k: steps[k](*call)[1] for k in VARIANTS}
    ref = jax.tree_util.tree_leaves(grads["jax.grad"])
    top = max(float(jnp.max(jnp.abs(v))) for v in ref)
    for k in ("lse", "probs"):          # per leaf, against max(its scale, 1e-3 of the largest): dbk is 0
        grad_diff[f"{k}_vs_jax.grad"] = max(                                    # up to rounding
            float(jnp.max(jnp.abs(u - v))) / max(float(jnp.max(jnp.abs(v))), 1e-3 * top)
            for u, v in zip(jax.tree_util.tree_leaves(grads[k]), ref))

    def run(k):
        return bm.timed(steps[k], *call)

    bm.warm_up(run, VARIANTS, args.warmup)
    names = ("lse/jax.grad", "probs/jax.grad", "lse/probs")
    ratios = {n: [] for n in names}
    med = {k: [] for k in VARIANTS}
    t0 = time.time()
    for i in range(args.rounds):
        t = {k: [] for k in VARIANTS}
        for j in range(args.reps):                      # one step of each, in a rotating order
            o = (i * args.reps + j) % len(VARIANTS)
            for k in VARIANTS[o:] + VARIANTS[:o]:
                t[k].append(run(k))
        for k in VARIANTS:
            med[k].append(statistics.median(t[k]))
        for n in names:
            a, b = n.split("/")
            ratios[n].append(statistics.median(t[a]) / statistics.median(t[b]))
    res = {
        "layer": f"attention({args.heads}, causal=True), batch {args.batch_size}, D {args.dim}, float32",
        "block_size": args.block_size, "temp_bytes": {str(t): m for t, m in memory.items()},
        "temp_ratio_lse": {str(t): m["lse"] / m["jax.grad"] for t, m in memory.items()},
        "temp_ratio_probs": {str(t): m["probs"] / m["jax.grad"] for t, m in memory.items()},
        "time_length": args.time_length, "rounds": args.rounds, "reps_per_round": args.reps,
        "timed_seconds": time.time() - t0,
        "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in med.items()},
        "ratio_median": {n: statistics.median(v) for n, v in ratios.items()},
        "ratio_iqr": {n: quartiles(v) for n, v in ratios.items()},
        "max_rel_grad_diff_float32": grad_diff,
        "machine": bm.machine(),
    }
    bm.write_results(args.out, "attention_memory", res, report, argv)
    return res


def report(res, command):
    m = res["machine"]
    lines = [f"# Attention: save=\"lse\" / save=\"probs\" vs jax.grad -- {res['layer']}", "",
             f"{m['backend']} x{m['devices']}, {m['cpus']} cores, load {m['load_avg_1m']:.1f}, jax {m['jax']}; "
             f"block {res['block_size']}; `{command}`", "",
             "XLA's compiled temporary memory of one jitted value-and-grad step:", "",
             "| T | lse MB | probs MB | jax.grad MB | lse / jax.grad | target | probs / jax.grad |",
             "|---|---|---|---|---|---|---|"]
    for t, mem in res["temp_bytes"].items():
        target = TARGETS.get(int(t))
        r = mem["lse"] / mem["jax.grad"]
        verdict = "" if target is None else f"<= {target} {'met' if r <= target else 'MISSED'}"
        lines.append(f"| {t} | {mem['lse'] / 1e6:.1f} | {mem['probs'] / 1e6:.1f} | {mem['jax.grad'] / 1e6:.1f} | "
                     f"{r:.3f} | {verdict} | {mem['probs'] / mem['jax.grad']:.3f} |")
    lines += ["", f"Step time at T = {res['time_length']}, paired: median over {res['rounds']} rounds of the ratio "
              f"of median step times ({res['reps_per_round']} steps per variant per round), IQR in brackets:", "",
              "| ratio | median (IQR) | target |", "|---|---|---|"]
    for n, v in res["ratio_median"].items():
        q = res["ratio_iqr"][n]
        target = f"<= {TIME_TARGET} {'met' if v <= TIME_TARGET else 'MISSED'}" if n == "lse/jax.grad" else ""
        lines.append(f"| {n} | {v:.3f} ({q[0]:.3f} - {q[1]:.3f}) | {target} |")
    lines += ["", "| variant | median step ms |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["median_step_ms"].items()]
    g = res["max_rel_grad_diff_float32"]
    lines += ["", "Max relative gradient difference at the timed length (float32): "
              + ", ".join(f"{k} {v:.2e}" for k, v in g.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Batch (and group) norm's two-reduction backward, A/B in one process: the best MNIST-1D CNN's training step.

Three jitted training steps (gradient + Adam update, batch 100, float32) on the same network,
batch and parameters, differing only in the gradient path:

* ``hand``      -- ``jp.value_and_grad`` with batch norm's backward
                   ``dx = gamma r (dy - dbeta/m - xhat dgamma/m)`` (two reductions, the default);
* ``hand_old``  -- the same with the generic four-reduction backward
                   ``r (dxhat - mean dxhat - xhat mean(dxhat xhat))`` (``norm._BN_TWO_REDUCTIONS =
                   False`` while the net is built; for a net with group norm, ``gn<G>`` tokens,
                   ``norm._GN_FACTORED = False`` likewise);
* ``autodiff``  -- ``jaxprop.autodiff.value_and_grad`` (``jax.value_and_grad`` of the same forward).

Timing: after warm-up, ``--rounds`` rounds of ``--reps`` steps of each variant, interleaved one step
at a time in a rotating order; each round gives the ratios hand/autodiff, hand_old/autodiff and
hand/hand_old of the variants' median step times (and of their fastest steps). Reported: the median
ratio over rounds and its interquartile range (a machine shared with other jobs drifts more than the
effect being measured; interleaving and pairing within a round cancel the drift). Memory and
kernels come from XLA's compiled step: ``memory_analysis().temp_size_in_bytes``,
``cost_analysis()["bytes accessed"]`` (an estimate: it counts a fusion's whole operands) and the
number of fusion instructions in the optimized HLO. Gradients of the three paths are compared at
the start, on perturbed parameters (at init gamma = 1, where both batch-norm formulas round alike).

    python experiments/bench/norm_backward.py                 # ~1-2 min on 2 busy cores
    python experiments/bench/norm_backward.py --rounds 51 --reps 20
    python experiments/bench/norm_backward.py --tag gn \
        --model cnn:c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-gap:pad=same

Writes ``experiments/bench/results/norm_backward[-TAG].{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from experiments.bench import benchmark as bm
from jaxprop import autodiff
from jaxprop.layers import norm
from jaxprop.models import build_model

BEST = "cnn:c32k5-bn-relu-c32k5-bn-relu-c32k5-bn-relu-c32k5-bn-relu-gap:pad=same"
VARIANTS = ("hand", "hand_old", "autodiff")


def build(spec, two_reductions):
    """The net of ``spec``; its batch/group norms use the new backward (True) or the generic one."""
    old = norm._BN_TWO_REDUCTIONS, norm._GN_FACTORED
    norm._BN_TWO_REDUCTIONS = norm._GN_FACTORED = two_reductions   # read when a norm layer is built
    try:
        return build_model(spec, 10)
    finally:
        norm._BN_TWO_REDUCTIONS, norm._GN_FACTORED = old


def make_step(vg, tx, stateful):
    def step(params, opt_state, state, x, y):
        if stateful:                                         # batch norm: ((J, new_state), grads)
            (value, new_state), grads = vg(params, x, y, state=state)
        else:
            (value, grads), new_state = vg(params, x, y), state
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_state, value
    return jax.jit(step)


def xla_figures(step, args):
    compiled = step.lower(*args).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    hlo = compiled.as_text()
    return {"temp_bytes": int(mem.temp_size_in_bytes),
            "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
            "flops": float(cost.get("flops", float("nan"))),
            "fusions": len(re.findall(r"\bfusion\(", hlo)),
            "hlo_instructions_entry": _entry_size(hlo)}


def _entry_size(hlo):
    """Instructions in the ENTRY computation (each is one kernel launch or a cheap bitcast/tuple)."""
    m = re.search(r"^ENTRY .*?\{\n(.*?)^\}", hlo, re.S | re.M)
    return len([ln for ln in m.group(1).splitlines() if "=" in ln]) if m else -1


def quartiles(v):
    q = statistics.quantiles(v, n=4)
    return [q[0], q[2]]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BEST)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--length", type=int, default=40, help="signal length (MNIST-1D: 40)")
    ap.add_argument("--rounds", type=int, default=31)
    ap.add_argument("--reps", type=int, default=10, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    nets = {"hand": build(args.model, True), "hand_old": build(args.model, False)}
    nets["autodiff"] = nets["hand"]
    loss = jp.softmax_cross_entropy()
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch_size, args.length)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch_size))
    _, params = nets["hand"].init(jax.random.key(0), x.shape)
    # perturb every parameter: at init gamma = 1, where the two batch-norm formulas round identically
    params = jax.tree_util.tree_map(
        lambda a: a * (1 + 0.2 * jnp.asarray(rng.standard_normal(a.shape), a.dtype)) + 0.01, params)
    state = jp.init_state(nets["hand"], x.shape)
    opt_state = tx.init(params)
    vgs = {"hand": jp.value_and_grad(nets["hand"], loss), "hand_old": jp.value_and_grad(nets["hand_old"], loss),
           "autodiff": autodiff.value_and_grad(nets["autodiff"], loss)}
    steps = {k: make_step(vgs[k], tx, nets[k].stateful) for k in VARIANTS}
    call = (params, opt_state, state, x, y)

    kw = {"state": state} if nets["hand"].stateful else {}
    grads = {k: jax.jit(lambda p, k=k: vgs[k](p, x, y, **kw)[1])(params) for k in VARIANTS}
    leaves = {k: jax.tree_util.tree_leaves(g) for k, g in grads.items()}

    def rel(a, b):
        return max(float(jnp.max(jnp.abs(u - v)) / jnp.max(jnp.abs(v))) for u, v in zip(leaves[a], leaves[b]))

    grad_diff = {"hand_vs_autodiff": rel("hand", "autodiff"), "hand_old_vs_autodiff": rel("hand_old", "autodiff"),
                 "hand_vs_hand_old": rel("hand", "hand_old")}
    xla = {k: xla_figures(steps[k], call) for k in VARIANTS}

    def run(k):
        return bm.timed(steps[k], *call)

    bm.warm_up(run, VARIANTS, args.warmup)
    med = {k: [] for k in VARIANTS}
    names = ("hand/autodiff", "hand_old/autodiff", "hand/hand_old")
    ratios = {"median": {k: [] for k in names}, "min": {k: [] for k in names}}
    t0 = time.time()
    for i in range(args.rounds):
        t = {k: [] for k in VARIANTS}
        for j in range(args.reps):                      # one step of each, in a rotating order
            o = (i * args.reps + j) % 3
            for k in VARIANTS[o:] + VARIANTS[:o]:
                t[k].append(run(k))
        for k in VARIANTS:
            med[k].append(statistics.median(t[k]))
        for stat, f in (("median", statistics.median), ("min", min)):
            for name in names:
                a, b = name.split("/")
                ratios[stat][name].append(f(t[a]) / f(t[b]))
    res = {
        "model": args.model, "batch_size": args.batch_size, "length": args.length, "dtype": "float32",
        "rounds": args.rounds, "reps_per_round": args.reps, "timed_seconds": time.time() - t0,
        "median_step_ms": {k: 1e3 * statistics.median(v) for k, v in med.items()},
        "ratio_median": {k: statistics.median(v) for k, v in ratios["median"].items()},
        "ratio_iqr": {k: quartiles(v) for k, v in ratios["median"].items()},
        "ratio_of_minima_median": {k: statistics.median(v) for k, v in ratios["min"].items()},
        "ratio_of_minima_iqr": {k: quartiles(v) for k, v in ratios["min"].items()},
        "xla": xla,
        "temp_ratio": {"hand/autodiff": xla["hand"]["temp_bytes"] / xla["autodiff"]["temp_bytes"],
                       "hand_old/autodiff": xla["hand_old"]["temp_bytes"] / xla["autodiff"]["temp_bytes"],
                       "hand/hand_old": xla["hand"]["temp_bytes"] / xla["hand_old"]["temp_bytes"]},
        "max_rel_grad_diff_float32": grad_diff,
        "machine": {"backend": jax.default_backend(), "devices": jax.device_count(), "cpus": os.cpu_count(),
                    "load_avg_1m": os.getloadavg()[0], "jax": jax.__version__, "python": platform.python_version()},
    }
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "norm_backward" + (f"-{args.tag}" if args.tag else ""))
    with open(stem + ".json", "w") as f:
        json.dump(res, f, indent=2)
    with open(stem + ".md", "w") as f:
        f.write(report(res, " ".join(["python experiments/bench/norm_backward.py"]
                                     + list(sys.argv[1:] if argv is None else argv))))
    print(report(res, ""))
    return res


def report(res, command):
    m = res["machine"]
    lines = [f"# Norm backward with two reductions: {res['model']}, batch {res['batch_size']}, float32", "",
             f"{m['backend']} x{m['devices']}, {m['cpus']} cores, load {m['load_avg_1m']:.1f}, jax {m['jax']}; "
             f"{res['rounds']} rounds x {res['reps_per_round']} steps per variant" + (f"; `{command}`" if command else ""),
             "", "Step-time ratio per round: of the variants' median step times (\"median\"), and of their fastest",
             "steps (\"min\", less sensitive to other jobs taking the cores); median over rounds and IQR.", "",
             "| ratio | time: median (IQR) | time, min: median (IQR) | temp memory | bytes accessed | fusions |",
             "|---|---|---|---|---|---|"]
    x = res["xla"]
    for name in ("hand/autodiff", "hand_old/autodiff", "hand/hand_old"):
        a, b = name.split("/")
        q, qm = res["ratio_iqr"][name], res["ratio_of_minima_iqr"][name]
        lines.append(f"| {name} | {res['ratio_median'][name]:.4f} ({q[0]:.4f} - {q[1]:.4f}) | "
                     f"{res['ratio_of_minima_median'][name]:.4f} ({qm[0]:.4f} - {qm[1]:.4f}) | "
                     f"{x[a]['temp_bytes'] / x[b]['temp_bytes']:.4f} | "
                     f"{x[a]['bytes_accessed'] / x[b]['bytes_accessed']:.4f} | {x[a]['fusions']} vs {x[b]['fusions']} |")
    lines += ["", "| variant | median step ms | temp bytes | bytes accessed | fusions |", "|---|---|---|---|---|"]
    for k in VARIANTS:
        lines.append(f"| {k} | {res['median_step_ms'][k]:.3f} | {x[k]['temp_bytes']} | {x[k]['bytes_accessed']:.0f} | "
                     f"{x[k]['fusions']} |")
    g = res["max_rel_grad_diff_float32"]
    lines += ["", "Max relative gradient difference (float32): " + ", ".join(f"{k} {v:.2e}" for k, v in g.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

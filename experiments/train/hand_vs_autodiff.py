"""Hand-written backprop vs jax autodiff: the same training run, two gradient paths.

For each seed, trains the same MLP on MNIST-1D twice from the same
initialisation and data order -- once with ``grad="hand"`` (jaxprop's
backward passes), once with ``grad="autodiff"`` (``jax.value_and_grad`` of the
same forward) -- and records, at every evaluation, the largest parameter
difference between the two runs. float32 first, then float64 (x64 switched
on half-way, so the float32 runs are pure float32).

    python -m experiments.train.hand_vs_autodiff               # 5 seeds, 6000 steps, ~3-4 min on 2 cores
    python -m experiments.train.hand_vs_autodiff --seeds 2 --steps 500 --out /tmp/hva   # quick look

Writes to --out (default experiments/train/results/hand_vs_autodiff):
``hand_vs_autodiff.png`` (curves overlaid, parameter difference over time,
final accuracies), ``param_diff.csv``, ``summary.json`` and ``summary.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time

import jax
import numpy as np
import optax

from jaxprop import data, train
from jaxprop.runner.models import build_model

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "hand_vs_autodiff")


def param_diff(a, b):
    """(max |a - b|, max |a - b| / max |a|) over all leaves."""
    abs_err = max(float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) for x, y in zip(a, b))
    scale = max(float(np.max(np.abs(x))) for x in a)
    return abs_err, abs_err / scale


def run_pair(ds, net, tx, seed, steps, dtype, eval_every):
    snaps, runs = {}, {}
    for grad in ("hand", "autodiff"):
        snaps[grad] = {}

        def keep(row, params, store=snaps[grad]):
            store[row["step"]] = [np.array(leaf) for leaf in jax.tree_util.tree_leaves(params)]

        runs[grad] = train.fit(net, "softmax_cross_entropy", tx, ds, grad=grad, steps=steps, batch_size=100,
                               seed=seed, eval_every=eval_every, dtype=dtype, progress=False, callback=keep)
    diffs = [(s,) + param_diff(snaps["hand"][s], snaps["autodiff"][s]) for s in sorted(snaps["hand"])]
    return runs, diffs


def paired_stats(a, b):
    d = np.asarray(a) - np.asarray(b)
    n = len(d)
    out = {"mean_diff": float(d.mean()), "std_diff": float(d.std(ddof=1)) if n > 1 else 0.0,
           "n_identical": int(np.sum(d == 0)), "n": n}
    if n > 1 and out["std_diff"] > 0:
        out["t"] = out["mean_diff"] / (out["std_diff"] / math.sqrt(n))
        try:
            from scipy import stats
            out["p_value"] = float(stats.ttest_rel(a, b).pvalue)
        except ImportError:
            out["p_value"] = None
    else:
        out["t"], out["p_value"] = 0.0, 1.0
    return out


def plot(results, path):
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = Figure(figsize=(13, 9), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)
    r32 = results["float32"]["runs"][0]
    for grad, style in (("hand", "-"), ("autodiff", "--")):
        rows = r32[grad]
        st = [r["step"] for r in rows]
        ax[0, 0].plot(st, [r["train_loss"] for r in rows], style, color="C0", label=f"train, {grad}")
        ax[0, 0].plot(st, [r["test_loss"] for r in rows], style, color="C1", label=f"test, {grad}")
        ax[0, 1].plot(st, [r["train_accuracy"] for r in rows], style, color="C0", label=f"train, {grad}")
        ax[0, 1].plot(st, [r["test_accuracy"] for r in rows], style, color="C1", label=f"test, {grad}")
    ax[0, 0].set(yscale="log", xlabel="step", ylabel="loss", title="float32, seed 0: hand (solid) vs autodiff (dashed)")
    ax[0, 1].set(xlabel="step", ylabel="accuracy", title="float32, seed 0: accuracy")
    for a in ax[0]:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    for dtype, color in (("float32", "C3"), ("float64", "C2")):
        for i, diffs in enumerate(results[dtype]["diffs"]):
            st = [d[0] for d in diffs if d[0] > 0]
            ax[1, 0].plot(st, [max(d[2], 1e-18) for d in diffs if d[0] > 0], color=color, alpha=0.7,
                          label=dtype if i == 0 else None)
    ax[1, 0].set(yscale="log", xlabel="step", ylabel="max |p_hand - p_autodiff| / max |p|",
                 title="largest parameter difference (each line a seed)")
    ax[1, 0].legend()
    ax[1, 0].grid(alpha=0.3)
    acc = results["float32"]["final_test_accuracy"]
    ax[1, 1].scatter(acc["hand"], acc["autodiff"], label="float32, one point per seed")
    acc64 = results["float64"]["final_test_accuracy"]
    ax[1, 1].scatter(acc64["hand"], acc64["autodiff"], marker="x", label="float64")
    lo = min(acc["hand"] + acc["autodiff"] + acc64["hand"]) - 0.01
    hi = max(acc["hand"] + acc["autodiff"] + acc64["hand"]) + 0.01
    ax[1, 1].plot([lo, hi], [lo, hi], "k:", lw=1)
    ax[1, 1].set(xlabel="final test accuracy, hand", ylabel="final test accuracy, autodiff",
                 title="final test accuracy per seed")
    ax[1, 1].legend()
    ax[1, 1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--model", default="mlp:100-100:relu")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    ds = data.load("mnist1d")
    net = build_model(args.model, ds.n_classes)
    tx = optax.adam(args.lr)
    results = {}
    t0 = time.perf_counter()
    for dtype in ("float32", "float64"):
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)          # after every float32 run
        runs, diffs = [], []
        for seed in range(args.seeds):
            r, d = run_pair(ds, net, tx, seed, args.steps, dtype, args.eval_every)
            runs.append({g: r[g].history for g in r})
            diffs.append(d)
            print(f"{dtype} seed {seed}: final test acc hand {r['hand'].history[-1]['test_accuracy']:.3f} "
                  f"autodiff {r['autodiff'].history[-1]['test_accuracy']:.3f}; max rel param diff "
                  f"{max(x[2] for x in d):.2e}; {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        acc = {g: [run[g][-1]["test_accuracy"] for run in runs] for g in ("hand", "autodiff")}
        checkpoints = sorted({100, 200, 500, 1000, 2000, args.steps} & {x[0] for x in diffs[0]})
        results[dtype] = {
            "runs": runs, "diffs": diffs, "final_test_accuracy": acc,
            "max_rel_diff_by_step": {s: max(dict((x[0], x[2]) for x in d)[s] for d in diffs) for s in checkpoints},
            "max_abs_diff_by_step": {s: max(dict((x[0], x[1]) for x in d)[s] for d in diffs) for s in checkpoints},
            "accuracy_stats": {g: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0}
                               for g, v in acc.items()},
            "paired": paired_stats(acc["hand"], acc["autodiff"]),
        }

    plot(results, os.path.join(args.out, "hand_vs_autodiff.png"))
    with open(os.path.join(args.out, "param_diff.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dtype", "seed", "step", "max_abs_diff", "max_rel_diff"])
        for dtype in results:
            for seed, d in enumerate(results[dtype]["diffs"]):
                for s, a, r in d:
                    w.writerow([dtype, seed, s, f"{a:.6e}", f"{r:.6e}"])
    summary = {
        "setup": {"dataset": "mnist1d", "model": args.model, "optimizer": f"adam lr {args.lr}", "batch_size": 100,
                  "steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every,
                  "device": str(jax.devices()[0]), "jax": jax.__version__,
                  "command": "python -m experiments.train.hand_vs_autodiff " + " ".join(argv or sys.argv[1:])},
        **{dtype: {k: v for k, v in res.items() if k not in ("runs", "diffs")} for dtype, res in results.items()},
        "wall_time_s": time.perf_counter() - t0,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    lines = ["# Hand-written vs autodiff gradients: same run, two paths", "",
             f"`{summary['setup']['command'].strip()}` -- MNIST-1D, {args.model}, Adam lr {args.lr}, batch 100, "
             f"{args.steps} steps, seeds 0..{args.seeds - 1}, {summary['setup']['device']}.", "",
             "Largest parameter difference over all seeds, max|p_hand - p_autodiff| / max|p|:", "",
             "| step | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    steps_shown = sorted(set().union(*(r["max_rel_diff_by_step"] for r in results.values())))
    for s in steps_shown:
        lines.append(f"| {s} | " + " | ".join(f"{results[d]['max_rel_diff_by_step'].get(s, float('nan')):.2e}"
                                             for d in results) + " |")
    lines += ["", "Final test accuracy (mean +/- std over seeds) and paired difference hand - autodiff:", "",
              "| dtype | hand | autodiff | mean diff | std diff | identical | paired t-test p |", "|---|---|---|---|---|---|---|"]
    for d, res in results.items():
        st, pr = res["accuracy_stats"], res["paired"]
        pv = "n/a" if pr["p_value"] is None else f"{pr['p_value']:.2f}"
        lines.append(f"| {d} | {st['hand']['mean']:.4f} +/- {st['hand']['std']:.4f} | "
                     f"{st['autodiff']['mean']:.4f} +/- {st['autodiff']['std']:.4f} | {pr['mean_diff']:+.4f} | "
                     f"{pr['std_diff']:.4f} | {pr['n_identical']}/{pr['n']} | {pv} |")
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {args.out}/hand_vs_autodiff.png, param_diff.csv, summary.json, summary.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

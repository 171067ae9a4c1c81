"""DP-SGD on MNIST-1D through the runner: test accuracy at a stated (epsilon, delta) beside the
non-private run of the same recipe.

The model is the best MNIST-1D CNN (experiments/train/cnn_mnist1d.py, 99.3 %) with ``gn4`` (group
norm, 4 groups) in place of ``bn``: batch norm in training mode mixes the examples of a batch, so
it has no per-example gradient and DP-SGD refuses it. The recipe is that CNN's (Adam, lr 1e-2,
cosine schedule, batch 100) shortened to ``--steps`` (default 1000, 25 epochs of the 4000
training examples) to fit a few CPU minutes. Each DP run adds ``--dp-clip 1 --dp-noise SIGMA``:
every example's gradient clipped to L2 norm 1 by the hand-written per-example rules (a norms
sweep and one reweighted backward), Gaussian noise of std SIGMA on the clipped sum; epsilon at
delta = 1e-5 (< 1 / N_train) from dp-accounting's RDP accountant, sampling rate q = 100 / 4000
(Poisson sampling assumed, as usual; the runner shuffles fixed-size batches).

    python -m experiments.train.dp_sgd                     # ~4 min on 2 busy cores
    python -m experiments.train.dp_sgd --steps 200 --noise 1.0 --out /tmp/dp   # smoke

Writes ``experiments/train/results/dp_sgd.{json,md}`` (run folders under ``--runs``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from jaxprop.runner import cli

MODEL = "cnn:c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-gap:pad=same"


def run_one(argv, out):
    if os.path.exists(out):
        shutil.rmtree(out)
    t = time.process_time()
    summary = cli.run(argv + ["--out", out, "--no-progress"])
    return summary, time.process_time() - t


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--noise", default="1.0,1.5", help="noise multipliers of the DP runs, comma-separated")
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "jaxprop-dp-sgd"))
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    base = ["--dataset", "mnist1d", "--model", MODEL, "--schedule", "cosine", "--batch-size", "100",
            "--steps", str(args.steps), "--eval-every", str(args.steps), "--checkpoint-every", "0",
            "--seed", str(args.seed)]
    configs = [("non-private", [])] + [
        (f"DP sigma={s}", ["--dp-clip", str(args.clip), "--dp-noise", s, "--dp-delta", str(args.delta)])
        for s in args.noise.split(",")]
    rows = []
    for label, extra in configs:
        summary, cpu = run_one(base + extra, os.path.join(args.runs, label.replace(" ", "_").replace("=", "")))
        rows.append({"run": label, "test_accuracy": summary["final_test_accuracy"],
                     "train_accuracy": summary["final_train_accuracy"], "epsilon": summary.get("dp_epsilon"),
                     "delta": summary.get("dp_delta"), "noise_multiplier": summary.get("dp_noise"),
                     "clip": summary.get("dp_clip"), "sampling_rate": summary.get("dp_sampling_rate"),
                     "steps": summary["steps"], "steps_per_s": summary["steps_per_s"], "cpu_s": cpu,
                     "command": "python experiments/train.py " + " ".join(base + extra)})
        print(f"{label}: test accuracy {rows[-1]['test_accuracy']:.4f}, epsilon {rows[-1]['epsilon']}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dp_sgd.json"), "w") as f:
        json.dump({"command": " ".join(["python -m experiments.train.dp_sgd"] + list(argv)), "rows": rows}, f, indent=1)
    lines = ["# DP-SGD on MNIST-1D (hand-written per-example rules), beside the non-private run", "",
             "`" + " ".join(["python -m experiments.train.dp_sgd"] + list(argv)) + f"` -- CNN `{MODEL}` "
             "(the best MNIST-1D CNN with group norm for batch norm), Adam lr 1e-2 cosine, batch 100, "
             f"{args.steps} steps, seed {args.seed}, float32. epsilon from dp-accounting (RDP), Poisson "
             "sampling assumed.", "",
             "| run | test accuracy | train accuracy | (epsilon, delta) | clip C | noise sigma | steps/s | CPU s |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        eps = "non-private (epsilon = inf)" if r["epsilon"] is None else f"({r['epsilon']:.2f}, {r['delta']:g})"
        lines.append(f"| {r['run']} | {100 * r['test_accuracy']:.1f} % | {100 * r['train_accuracy']:.1f} % | {eps} | "
                     f"{r['clip'] or '-'} | {r['noise_multiplier'] or '-'} | {r['steps_per_s']:.1f} | {r['cpu_s']:.0f} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "dp_sgd.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()

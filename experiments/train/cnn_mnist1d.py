"""CNN experiments of docs/cnn.md, run through the training runner (experiments/train.py).

Each experiment is one runner command repeated over seeds; this script runs them one after
another (in this process, through ``jaxprop.runner.cli.run``), then writes mean +/- std and the
per-seed figures to ``experiments/train/results/cnn/<experiment>.json`` and ``.md``::

    python -m experiments.train.cnn_mnist1d select select2    # recipe choice on validation splits
    python -m experiments.train.cnn_mnist1d paper best best_autodiff digits

Every run folder (config, metrics, curves, checkpoints) goes to ``runs/cnn/`` (not committed).
std is the sample standard deviation (ddof = 1) over the seeds. CPU time is the process
time of the run (both cores, compilation included); wall time is the runner's training loop.
"""
from __future__ import annotations

import argparse
import os
import sys

from experiments.train.seeds import aggregate, run_seeds, write

PAPER = "cnn:c25k5s2p1-relu-c25k3s2p1-relu-c25k3s2p1-relu"


def _bn4(width=32, k=5):
    return "-".join([f"c{width}k{k}-bn-relu"] * 4) + "-gap"


# name -> (runner options, seeds); "{seed}" is filled in
CANDIDATES = {
    "bn4-circular-3k": f"--model cnn:{_bn4()}:pad=circular --schedule cosine --steps 3000",
    "bn4-circular-6k": f"--model cnn:{_bn4()}:pad=circular --schedule cosine --steps 6000",
    "bn4-same-3k": f"--model cnn:{_bn4()}:pad=same --schedule cosine --steps 3000",
    "bn4-same-shift4-3k": f"--model cnn:{_bn4()}:pad=same:shift=4 --schedule cosine --steps 3000",
    "bn4-same-shift4-6k": f"--model cnn:{_bn4()}:pad=same:shift=4 --schedule cosine --steps 6000",
    "bn4-circular-w48-3k": f"--model cnn:{_bn4(48)}:pad=circular --schedule cosine --steps 3000",
    "bn4-circular-mp-3k": ("--model cnn:c32k5-bn-relu-c32k5-bn-relu-mp2-c64k3-bn-relu-c64k3-bn-relu-gap"
                           ":pad=circular --schedule cosine --steps 3000"),
}
SELECT_SEEDS = (0, 1)
# round 2: the three best of round 1 (bn4-circular-w48 left out: twice the cost of the others
# for the same round-1 mean as bn4-circular-mp), on a larger validation split (800), 3 seeds
FINALISTS = ("bn4-same-3k", "bn4-circular-mp-3k", "bn4-same-shift4-6k")
SELECT2_SEEDS = (0, 1, 2)

# the best mean validation accuracy in both rounds (experiments/train/results/cnn/select.md, select2.md)
BEST = CANDIDATES["bn4-same-3k"]

EXPERIMENTS = {
    "paper": f"--model {PAPER} --lr 1e-2 --batch-size 100 --steps 6000",
    "best": BEST,
    "best_autodiff": BEST + " --grad autodiff",
    "digits": None,                     # set below from the digits selection
}
# scikit-learn digits (8x8): candidates on a validation split (20% of the training set), 3 seeds
DIGITS_CANDIDATES = {
    "digits-bn3": ("--dataset digits --model cnn:c32k3-bn-relu-c32k3-bn-relu-mp2-c64k3-bn-relu-gap:in=8x8x1 "
                   "--schedule cosine --steps 2000 --batch-size 64"),
    "digits-plain": ("--dataset digits --model cnn:c32k3-relu-mp2-c64k3-relu-gap:in=8x8x1 "
                     "--schedule cosine --steps 2000 --batch-size 64"),
}
EXPERIMENTS["digits"] = DIGITS_CANDIDATES["digits-bn3"]

# each recipe selection: (candidates, seeds, validation fraction, prefix of the run folders)
SELECTIONS = {
    "select": (CANDIDATES, SELECT_SEEDS, "0.1", "select"),
    "select2": ({name: CANDIDATES[name] for name in FINALISTS}, SELECT2_SEEDS, "0.2", "select2"),
    "select_digits": (DIGITS_CANDIDATES, SELECT2_SEEDS, "0.2", "select"),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="CNN experiments (docs/cnn.md)")
    ap.add_argument("experiments", nargs="+", choices=list(SELECTIONS) + list(EXPERIMENTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cnn"))
    args = ap.parse_args(argv)
    for exp in args.experiments:
        if exp in SELECTIONS:
            candidates, seeds, val_fraction, prefix = SELECTIONS[exp]
            extra, table = ("--val-fraction", val_fraction), []
            for name, options in candidates.items():
                runs = run_seeds("cnn", f"{prefix}-{name}", options, seeds, extra)
                table.append(aggregate(name, options, runs, extra))
                write(args.results, exp, table)
        else:
            options = EXPERIMENTS[exp]
            runs = run_seeds("cnn", exp, options, args.seeds)
            write(args.results, exp, aggregate(exp, options, runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Worst relative error of every hand-written gradient against jax.grad, per layer.

Runs each case of the layer registry (``jaxprop.testing.CASES``) over several
random seeds, in float64 and float32, jitted, and writes the worst relative
error per case to experiments/verify/results/gradient_errors.md (and .csv).

    python -m experiments.verify.gradient_errors [--seeds 5] [--out DIR]
"""
import argparse
import csv
import os

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

from jaxprop import testing  # noqa: E402
from experiments.verify.gpu_check import backward_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def worst(case, dtype, seeds):
    """The largest worst-parameter relative error of ``case`` over ``seeds`` seeds (jitted)."""
    errs = []
    for seed in range(seeds):
        report = backward_report(case, dtype, jit=True, seed=seed)
        if not report.ok:
            print(report)
        errs.append(report.worst_rel_err)
    return max(errs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=RESULTS, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    rows = []
    for case in testing.CASES:
        e64, e32 = worst(case, jnp.float64, args.seeds), worst(case, jnp.float32, args.seeds)
        rows.append((case.name, e64, e32))
        print(f"{case.name:<24} float64 {e64:9.2e}   float32 {e32:9.2e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gradient_errors.csv"), "w", newline="") as fh:
        csv.writer(fh).writerows([("layer", "worst_rel_err_float64", "worst_rel_err_float32"), *rows])
    md = os.path.join(args.out, "gradient_errors.md")
    with open(md, "w") as fh:
        fh.write(f"Worst relative error vs jax.vjp over {args.seeds} seeds (random inputs and cotangents, "
                 f"jitted). Regenerate: `python -m experiments.verify.gradient_errors --seeds {args.seeds}`\n\n")
        fh.write("| layer | float64 | float32 |\n|---|---|---|\n")
        for name, e64, e32 in rows:
            fh.write(f"| {name} | {e64:.2e} | {e32:.2e} |\n")
    print(f"wrote {md}")


if __name__ == "__main__":
    main()

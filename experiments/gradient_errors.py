"""Worst relative error of every hand-written gradient against jax.grad, per layer.

Runs each case of the layer registry (tests/cases.py) over several random seeds,
in float64 and float32, jitted, and writes the worst relative error per layer to
experiments/results/gradient_errors.md (and .csv).

    python experiments/gradient_errors.py [--seeds 5]
"""
import argparse
import csv
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp  # noqa: E402

import jaxprop as jp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from cases import CASES  # noqa: E402


def worst(case, dtype, seeds):
    layer = case.make()
    errs = []
    for seed in range(seeds):
        k_init, k_x = jax.random.split(jax.random.key(seed))
        _, params = layer.init(k_init, case.in_shape)
        params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
        x = (case.x_fn or (lambda k, s, d: jax.random.normal(k, s, d)))(k_x, case.in_shape, dtype)
        ctx = dict(case.ctx)
        if layer.stateful and "state" not in ctx:
            ctx["state"] = jax.tree_util.tree_map(lambda a: a.astype(dtype), jp.init_state(layer, case.in_shape))
        with jax.default_matmul_precision("highest"):
            report = jp.check_layer(layer, params, x, fd=False, jit=True, seed=seed, **ctx)
        if not report.ok:
            print(report)
        errs.append(report.worst_rel_err)
    return max(errs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args()
    rows = []
    for case in CASES:
        e64, e32 = worst(case, jnp.float64, args.seeds), worst(case, jnp.float32, args.seeds)
        rows.append((case.name, e64, e32))
        print(f"{case.name:<24} float64 {e64:9.2e}   float32 {e32:9.2e}", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "gradient_errors.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("layer", "worst_rel_err_float64", "worst_rel_err_float32"), *rows])
    with open(out / "gradient_errors.md", "w") as fh:
        fh.write(f"Worst relative error vs jax.vjp over {args.seeds} seeds (random inputs and cotangents, "
                 f"jitted). Regenerate: `python experiments/gradient_errors.py --seeds {args.seeds}`\n\n")
        fh.write("| layer | float64 | float32 |\n|---|---|---|\n")
        for name, e64, e32 in rows:
            fh.write(f"| {name} | {e64:.2e} | {e32:.2e} |\n")
    print(f"wrote {out / 'gradient_errors.md'}")


if __name__ == "__main__":
    main()

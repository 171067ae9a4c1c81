"""Accelerator check: verify the hand-written gradients on the device, then run the benchmark there.

One command, sized to finish in about 8 minutes on one H200:

    python -m experiments.verify.gpu_check              # on a machine with a GPU (jax[cuda] installed)
    python -m experiments.verify.gpu_check --cpu-smoke  # the same script on CPU, tiny sizes (a few minutes)

1. Gradients: every case of the layer registry ``jaxprop.testing.CASES`` (each
   public layer and mode, nets built from them), a net with repeat and its loss,
   and bfloat16 mixed precision, against jax.grad/jax.vjp with random
   cotangents, on the default device: float32 (tolerance 1e-4 or the case's
   own, matmuls at "highest" precision so TF32 does not blur the comparison)
   and float64 (1e-9), jitted and not; finite differences in float64 eager
   where the case allows them.
2. Benchmark: experiments/bench/benchmark.py's sweep on the device (float32 at the
   backend's default matmul precision, as users run it; with the bfloat16
   mixed-precision step timed too), with a time budget so the whole run ends in
   time; results in experiments/bench/results/<backend>/benchmark_gpu.{csv,md}.
3. A summary in experiments/verify/results/gpu_check.md (or
   gpu_check_cpu_smoke.md); exit status 1 if any gradient check failed.
   ``--out DIR`` puts the summary and the sweep's files in DIR instead.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ARGS = None


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", "--quick", dest="cpu_smoke", action="store_true",
                    help="run on CPU with tiny sizes (to test the script without an accelerator)")
    ap.add_argument("--budget-s", type=float, default=400.0,
                    help="the benchmark starts no new size after this many seconds of the whole run")
    ap.add_argument("--skip-benchmark", action="store_true")
    ap.add_argument("--out", default=None, help="folder for every file of the run (default: the summary in "
                    "experiments/verify/results, the sweep in experiments/bench/results)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"          # before jax is imported

import jax                                           # noqa: E402
import jax.numpy as jnp                              # noqa: E402

import jaxprop as jp                                 # noqa: E402
from jaxprop import testing                          # noqa: E402
from experiments.bench import benchmark              # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ----------------------------------------------------------------------------- checks

def backward_report(case, dtype, jit, seed=0):
    """``jaxprop.testing.check_backward``'s comparison on the default device, returned
    (a GradientReport, with its worst error) instead of raised."""
    with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision("highest"):
        layer, params, x, ctx = testing.setup(case, dtype, seed)
        rtol = case.rtol32 if dtype == jnp.float32 else None
        return jp.check_layer(layer, params, x, jit=jit, fd=case.fd and dtype == jnp.float64 and not jit,
                              rtol=rtol, seed=seed, **ctx)


def verify_gradients(log, smoke=False):
    """Every case in float32 and float64, jitted and not (smoke: float64 eager
    and float32 jitted only). Returns the failures and the number of checks."""
    failures, n = [], 0
    for case in testing.CASES:
        for dtype in (jnp.float32, jnp.float64):
            for jit in (False, True):
                if smoke and jit != (dtype == jnp.float32):
                    continue
                n += 1
                try:
                    report = backward_report(case, dtype, jit)
                    ok, detail = report.ok, f"worst rel err {report.worst_rel_err:.2e}"
                except Exception as e:                # a layer that fails to run is a failure too
                    ok, detail = False, f"{type(e).__name__}: {e}"
                tag = f"{case.name:20s} {jnp.dtype(dtype).name:8s} {'jit' if jit else 'eager':5s}"
                log(f"  {tag} {'ok  ' if ok else 'FAIL'} {detail}")
                if not ok:
                    failures.append(f"{tag}: {detail}")
    # a whole network with its loss, float64 and float32, jitted
    net = jp.serial(jp.dense(16), jp.relu(), jp.repeat(jp.serial(jp.dense(16), jp.tanh()), 3), jp.dense(4))
    for dtype in (jnp.float32, jnp.float64):
        n += 1
        with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision("highest"):
            _, params, x, _ = testing.setup(testing.Case("mlp+repeat", lambda: net, (8, 6)), dtype)
            y = jax.random.randint(jax.random.key(3), (8,), 0, 4)
            report = jp.check_gradients(net, jp.softmax_cross_entropy(), params, x, y, jit=True,
                                        fd=dtype == jnp.float64)
        log(f"  {'mlp+repeat':20s} {jnp.dtype(dtype).name:8s} jit   {'ok  ' if report.ok else 'FAIL'} "
            f"worst rel err {report.worst_rel_err:.2e}")
        if not report.ok:
            failures.append(f"mlp+repeat {jnp.dtype(dtype).name}: {report.explain()}")
    # mixed precision: bfloat16 gradients against float32 ones (relative L2 error)
    n += 1
    _, params, x, _ = testing.setup(testing.Case("mlp+repeat", lambda: net, (64, 6)), jnp.float32)
    y = jax.random.randint(jax.random.key(3), (64,), 0, 4)
    loss = jp.softmax_cross_entropy()
    with jax.default_matmul_precision("highest"):
        _, g32 = jax.jit(jp.value_and_grad(net, loss))(params, x, y)
    _, g16 = jax.jit(jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.bfloat16))(params, x, y)
    errs = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32))]
    ok = max(errs) <= 0.1
    log(f"  {'bf16 mixed':20s} {'bfloat16':8s} jit   {'ok  ' if ok else 'FAIL'} worst rel L2 vs float32 "
        f"{max(errs):.2e} (tolerance 1e-1)")
    if not ok:
        failures.append(f"bf16 mixed precision: rel L2 {max(errs):.2e}")
    return failures, n


# ----------------------------------------------------------------------------- main

def main(args):
    t0 = time.perf_counter()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    devices = jax.devices()
    log(f"# Accelerator check ({'CPU smoke test' if args.cpu_smoke else 'device'})")
    log("")
    log(f"- jax {jax.__version__}, backend {jax.default_backend()}, devices: "
        + ", ".join(f"{d.platform}:{d.device_kind}" for d in devices))
    if not args.cpu_smoke and jax.default_backend() == "cpu":
        log("- WARNING: no accelerator found (is jax[cuda] installed?); running on CPU")
    log("")
    log("## Gradients on the device")
    log("")
    failures, n = verify_gradients(log, smoke=args.cpu_smoke)
    t_verify = time.perf_counter() - t0
    log("")
    log(f"- {n - len(failures)}/{n} checks passed ({time.perf_counter() - t0:.0f} s)")
    for f in failures:
        log(f"- FAILED: {f}")

    prefix = "benchmark_cpu_smoke" if args.cpu_smoke else "benchmark_gpu"
    if not args.skip_benchmark:
        log("")
        log("## Benchmark")
        log("")
        if args.cpu_smoke:
            bargs = ["--batch", "64", "--width", "32", "--depth", "2", "--pairs", "3", "--min-block-s", "0.01",
                     "--no-torch", "--no-cnn", "--compile-study-width", "32", "--prefix", prefix]
            bargs += ["--mixed"]
        else:
            bargs = ["--pairs", "7", "--min-block-s", "0.1", "--mixed", "--repeat-rows",
                     "--budget-s", f"{max(60.0, args.budget_s - t_verify):.0f}", "--prefix", prefix]
        bench_out = args.out or os.path.join(benchmark.RESULTS, jax.default_backend())
        bargs += ["--out", bench_out] if args.out else []
        log("`python -m experiments.bench.benchmark " + " ".join(bargs) + "`")
        try:
            rows, study = benchmark.main(bargs)
            log("")
            log(benchmark.table(rows))
            log("")
            lines.extend(benchmark.targets(rows, study))
            log(f"\n- full results: {os.path.relpath(os.path.join(bench_out, prefix))}.md and .csv")
        except Exception:
            log("benchmark failed:\n```\n" + traceback.format_exc() + "```")
            failures.append("benchmark")
    log(f"\n- total wall time {time.perf_counter() - t0:.0f} s")
    out = args.out or RESULTS
    path = os.path.join(out, "gpu_check_cpu_smoke.md" if args.cpu_smoke else "gpu_check.md")
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))

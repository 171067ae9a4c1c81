"""Accelerator check: verify the hand-written gradients on the device, then run the benchmark there.

One command, sized to finish in about 8 minutes on one H200:

    python experiments/gpu_check.py                 # on a machine with a GPU (jax[cuda] installed)
    python experiments/gpu_check.py --cpu-smoke     # the same script on CPU, tiny sizes (~1 minute)

1. Gradients: every public layer (and nets built from them, repeat and mixed
   precision included) against jax.grad/jax.vjp with random cotangents, on the
   default device: float32 (tolerance 1e-4, matmuls at "highest" precision so
   TF32 does not blur the comparison) and float64 (1e-9), jitted and not;
   finite differences in float64 for a few nets.
2. Benchmark: experiments/benchmark.py's sweep on the device (float32 at the
   backend's default matmul precision, as users run it; with the bfloat16
   mixed-precision step timed too), with a time budget so the whole run ends in
   time; results in experiments/results/benchmark_gpu.{csv,md}.
3. A summary in experiments/results/benchmark_gpu_check.md (or
   benchmark_cpu_smoke_check.md); exit status 1 if any gradient check failed.
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
    return ap.parse_args(argv)


if __name__ == "__main__":
    ARGS = parse()
    if ARGS.cpu_smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"          # before jax is imported

import jax                                           # noqa: E402
import jax.numpy as jnp                              # noqa: E402
import numpy as np                                   # noqa: E402

import jaxprop as jp                                 # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark                                     # noqa: E402


# ----------------------------------------------------------------------------- cases

def layer_cases():
    """(name, make_layer, in_shape, forward keywords) for every public layer."""
    key = jax.random.key(7)
    cases = [
        ("dense", lambda: jp.dense(7), (5, 4), {}),
        ("dense_3d", lambda: jp.dense(4, bias=False), (3, 2, 5), {}),
        ("identity", jp.identity, (4, 3), {}),
        ("sigmoid", jp.sigmoid, (4, 6), {}),
        ("tanh", jp.tanh, (4, 6), {}),
        ("relu", jp.relu, (5, 6), {}),
        ("leaky_relu", lambda: jp.leaky_relu(0.1), (5, 6), {}),
        ("elu", lambda: jp.elu(0.7), (5, 6), {}),
        ("softplus", jp.softplus, (4, 6), {}),
        ("gelu", jp.gelu, (4, 6), {}),
        ("gelu_tanh", lambda: jp.gelu(approximate=True), (4, 6), {}),
        ("silu", jp.silu, (4, 6), {}),
        ("softmax", jp.softmax, (4, 5), {}),
        ("log_softmax", jp.log_softmax, (4, 5), {}),
        ("flatten", jp.flatten, (3, 2, 4), {}),
        ("dropout", lambda: jp.dropout(0.3), (6, 5), {"key": key, "train": True}),
        ("serial", lambda: jp.serial(jp.dense(6), jp.tanh(), jp.dense(3)), (4, 5), {}),
        ("residual", lambda: jp.residual(jp.serial(jp.dense(5), jp.gelu(), jp.dense(5))), (4, 5), {}),
        ("repeat", lambda: jp.repeat(jp.serial(jp.dense(5), jp.relu()), 4), (4, 5), {}),
    ]
    if hasattr(jp, "conv1d"):
        cases += [("conv1d", lambda: jp.conv1d(4, 3, stride=2), (2, 13, 2), {}),
                  ("conv2d", lambda: jp.conv2d(3, (3, 2), stride=(2, 1)), (2, 9, 8, 2), {})]
    if hasattr(jp, "max_pool"):
        cases += [("max_pool", lambda: jp.max_pool(3, 2, "SAME"), (2, 10, 3), {}),
                  ("avg_pool", lambda: jp.avg_pool(3, 2, "SAME"), (2, 10, 3), {})]
    if hasattr(jp, "batch_norm"):
        cases += [("batch_norm", lambda: jp.batch_norm(0.8), (3, 5, 4), {"train": True}),
                  ("layer_norm", jp.layer_norm, (3, 5, 4), {})]
    return cases


def setup(make, in_shape, ctx, dtype, seed=0):
    layer = make()
    k_init, k_x = jax.random.split(jax.random.key(seed))
    params = jax.jit(lambda k: layer.init(k, in_shape)[1])(k_init)
    params = jp.cast_floating(params, dtype)
    # |x| >= 0.1: no input sits on a kink (relu, max) where finite differences mislead
    k1, k2 = jax.random.split(k_x)
    x = (0.1 + jax.random.uniform(k1, in_shape, dtype)) * jnp.where(
        jax.random.bernoulli(k2, 0.5, in_shape), 1.0, -1.0).astype(dtype)
    ctx = dict(ctx)
    if layer.stateful and "state" not in ctx:
        ctx["state"] = jp.cast_floating(jp.init_state(layer, in_shape), dtype)
    return layer, params, x, ctx


def verify_gradients(log, smoke=False):
    """Every case in float32 and float64, jitted and not (smoke: float64 eager
    and float32 jitted only). Returns the failures and the number of checks."""
    failures, n = [], 0
    for name, make, in_shape, ctx in layer_cases():
        for dtype in (jnp.float32, jnp.float64):
            for jit in (False, True):
                if smoke and jit != (dtype == jnp.float32):
                    continue
                n += 1
                try:
                    with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision("highest"):
                        layer, params, x, c = setup(make, in_shape, ctx, dtype)
                        report = jp.check_layer(layer, params, x, jit=jit,
                                                fd=dtype == jnp.float64 and not jit, **c)
                    ok, detail = report.ok, f"worst rel err {report.worst_rel_err:.2e}"
                except Exception as e:                # a layer that fails to run is a failure too
                    ok, detail = False, f"{type(e).__name__}: {e}"
                tag = f"{name:12s} {jnp.dtype(dtype).name:8s} {'jit' if jit else 'eager':5s}"
                log(f"  {tag} {'ok  ' if ok else 'FAIL'} {detail}")
                if not ok:
                    failures.append(f"{tag}: {detail}")
    # a whole network with its loss, float64 and float32, jitted
    net = jp.serial(jp.dense(16), jp.relu(), jp.repeat(jp.serial(jp.dense(16), jp.tanh()), 3), jp.dense(4))
    for dtype in (jnp.float32, jnp.float64):
        n += 1
        with jax.enable_x64(dtype == jnp.float64), jax.default_matmul_precision("highest"):
            _, params, x, _ = setup(lambda: net, (8, 6), {}, dtype)
            y = jax.random.randint(jax.random.key(3), (8,), 0, 4)
            report = jp.check_gradients(net, jp.softmax_cross_entropy(), params, x, y, jit=True,
                                        fd=dtype == jnp.float64)
        log(f"  {'mlp+repeat':12s} {jnp.dtype(dtype).name:8s} jit   {'ok  ' if report.ok else 'FAIL'} "
            f"worst rel err {report.worst_rel_err:.2e}")
        if not report.ok:
            failures.append(f"mlp+repeat {jnp.dtype(dtype).name}: {report.explain()}")
    # mixed precision: bfloat16 gradients against float32 ones (relative L2 error)
    n += 1
    _, params, x, _ = setup(lambda: net, (64, 6), {}, jnp.float32)
    y = jax.random.randint(jax.random.key(3), (64,), 0, 4)
    loss = jp.softmax_cross_entropy()
    with jax.default_matmul_precision("highest"):
        _, g32 = jax.jit(jp.value_and_grad(net, loss))(params, x, y)
    _, g16 = jax.jit(jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.bfloat16))(params, x, y)
    errs = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree_util.tree_leaves(g16), jax.tree_util.tree_leaves(g32))]
    ok = max(errs) <= 0.1
    log(f"  {'bf16 mixed':12s} {'bfloat16':8s} jit   {'ok  ' if ok else 'FAIL'} worst rel L2 vs float32 "
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
        log("`python experiments/benchmark.py " + " ".join(bargs) + "`")
        try:
            rows, study = benchmark.main(bargs)
            log("")
            log(benchmark.table(rows))
            log("")
            lines.extend(benchmark.targets(rows, study))
            log(f"\n- full results: experiments/results/{prefix}.md and .csv")
        except Exception:
            log("benchmark failed:\n```\n" + traceback.format_exc() + "```")
            failures.append("benchmark")
    log(f"\n- total wall time {time.perf_counter() - t0:.0f} s")
    path = os.path.join(benchmark.RESULTS, prefix + "_check.md")
    os.makedirs(benchmark.RESULTS, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))

"""Step time of the sharded hand-written training step on 1, 2, 4, 8 (emulated) devices.

    python -m experiments.bench.scaling [--devices 1 2 4 8] [--batch 512] [--width 256]
                                        [--steps 50] [--out experiments/bench/results/scaling]

On CPU the devices are emulated: the script adds
``--xla_force_host_platform_device_count=<max devices>`` to ``XLA_FLAGS``
before JAX starts (other backends ignore that flag and use their real
devices). Emulated CPU devices share the machine's cores, so the step cannot
get faster; what the numbers show is the cost of the real SPMD machinery
(partitioned step, gradient all-reduce) and that the sharded step computes
the single-device numbers.

For each device count D it times, with the global batch fixed ("strong
scaling") and with the per-device batch fixed ("weak scaling"):

* ``partitioner``: ``jaxprop.distributed.data_parallel_step`` -- ``jax.jit``
  with in/out shardings, the all-reduce inserted by XLA;
* ``psum``: the same step under ``jax.shard_map`` with an explicit
  ``pmean`` of the gradients;

and a plain single-device ``jax.jit`` step as the baseline. Every variant starts
from the same parameters and data; after the timed steps its parameters are
compared with the baseline's (``max_param_diff``, in the timing dtype), and a
separate float64 run of ``--check-steps`` steps per device count and method
checks the equality to rounding. Results: ``scaling.json``, ``scaling.csv``,
``scaling.md`` and, with matplotlib, ``scaling.png``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import platform
import statistics
import sys
import time

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--batch", type=int, default=512, help="global batch (strong scaling)")
    ap.add_argument("--per-device-batch", type=int, default=64, help="per-device batch (weak scaling)")
    ap.add_argument("--width", type=int, default=256, help="hidden width of the 2-hidden-layer MLP")
    ap.add_argument("--features", type=int, default=40)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["partitioner", "psum"], choices=["partitioner", "psum"])
    ap.add_argument("--modes", nargs="+", default=["strong", "weak"], choices=["strong", "weak"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="for the timing")
    ap.add_argument("--check-steps", type=int, default=20,
                    help="float64 steps of the equality check per device count (0: skip)")
    ap.add_argument("--out", default=str(RESULTS / "scaling"))
    return ap.parse_args()


def emulate_devices(n: int):
    """Ask the CPU backend for n devices; must run before JAX starts."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n}").strip()


def main():
    args = parse_args()
    emulate_devices(max(args.devices))

    import jax
    jax.config.update("jax_enable_x64", True)          # for the float64 equality check; arrays are typed
    import numpy as np
    import optax
    import jaxprop as jp
    from jaxprop import distributed as dist

    if jax.device_count() < max(args.devices):      # e.g. one GPU: measure what is there
        print(f"scaling: JAX sees {jax.device_count()} {jax.default_backend()} device(s); skipping "
              f"{[d for d in args.devices if d > jax.device_count()]}", flush=True)
        args.devices = [d for d in args.devices if d <= jax.device_count()]
    dtype = np.dtype(args.dtype)
    if args.check_steps and args.check_steps < 1:
        sys.exit("scaling: --check-steps must be positive (0 skips the check)")
    net = jp.serial(jp.dense(args.width), jp.relu(), jp.dense(args.width), jp.relu(),
                    jp.dense(args.classes))
    loss = jp.softmax_cross_entropy()
    grad_fn = jp.value_and_grad(net, loss)
    tx = optax.adam(1e-3)
    def problem(batch, dtype=dtype):
        rng = np.random.default_rng(batch)             # the same data for every variant of a batch
        _, params = net.init(jax.random.key(0), (batch, args.features))
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, dtype), params)
        x = rng.standard_normal((batch, args.features)).astype(dtype)
        y = rng.integers(0, args.classes, batch).astype(np.int32)
        return params, x, y

    def timed(step, params, opt_state, x, y):
        t0 = time.perf_counter()
        params, opt_state, value = step(params, opt_state, x, y)
        jax.block_until_ready(value)
        first = time.perf_counter() - t0                 # compile + one step
        for _ in range(args.warmup):
            params, opt_state, value = step(params, opt_state, x, y)
        jax.block_until_ready(params)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            params, opt_state, value = step(params, opt_state, x, y)
            jax.block_until_ready((params, value))
            times.append(time.perf_counter() - t0)
        return params, first, times

    def plain(batch):
        def step(params, opt_state, x, y):
            value, grads = grad_fn(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, value
        return jax.jit(step)

    rows, baselines = [], {}
    for mode in args.modes:
        for d in args.devices:
            batch = args.batch if mode == "strong" else args.per_device_batch * d
            params, x, y = problem(batch)
            if batch not in baselines:
                p_ref, first, times = timed(plain(batch), params, tx.init(params), x, y)
                baselines[batch] = p_ref
                rows.append(dict(mode=mode, method="single-device jit", devices=1, global_batch=batch,
                                 per_device_batch=batch, compile_and_first_s=first,
                                 median_step_ms=1e3 * statistics.median(times),
                                 min_step_ms=1e3 * min(times), max_param_diff=0.0))
                print(f"{mode:6} {'single-device jit':18} D=1 B={batch:5d}  "
                      f"median {rows[-1]['median_step_ms']:8.3f} ms", flush=True)
            mesh = dist.make_mesh(d)
            for method in args.methods:
                step = dist.data_parallel_step(grad_fn, tx, mesh, method=method)
                p, o = dist.replicate((params, tx.init(params)), mesh)
                xs, ys = dist.shard_batch((x, y), mesh)
                p_out, first, times = timed(step, p, o, xs, ys)
                diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree_util.tree_leaves(dist.to_host(p_out)),
                                           jax.tree_util.tree_leaves(baselines[batch])))
                rows.append(dict(mode=mode, method=method, devices=d, global_batch=batch,
                                 per_device_batch=batch // d, compile_and_first_s=first,
                                 median_step_ms=1e3 * statistics.median(times),
                                 min_step_ms=1e3 * min(times), max_param_diff=diff))
                print(f"{mode:6} {method:18} D={d} B={batch:5d}  median {rows[-1]['median_step_ms']:8.3f} ms"
                      f"  (min {rows[-1]['min_step_ms']:.3f}, compile+first {first:.2f} s, "
                      f"param diff vs 1 device {diff:.1e})", flush=True)

    # equality in float64: the sharded step vs the single-device step, args.check_steps Adam steps
    checks = []
    if args.check_steps:
        params, x, y = problem(args.batch, np.dtype("float64"))
        ref = plain(args.batch)
        p_ref, o_ref = params, tx.init(params)
        for _ in range(args.check_steps):
            p_ref, o_ref, _ = ref(p_ref, o_ref, x, y)
        for d in args.devices:
            mesh = dist.make_mesh(d)
            for method in args.methods:
                step = dist.data_parallel_step(grad_fn, tx, mesh, method=method)
                p, o = dist.replicate((params, tx.init(params)), mesh)
                xs, ys = dist.shard_batch((x, y), mesh)
                for _ in range(args.check_steps):
                    p, o, _ = step(p, o, xs, ys)
                diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree_util.tree_leaves(dist.to_host(p)),
                                           jax.tree_util.tree_leaves(p_ref)))
                checks.append(dict(method=method, devices=d, global_batch=args.batch,
                                   steps=args.check_steps, max_param_diff_float64=diff))
                print(f"check  {method:18} D={d} B={args.batch:5d}  float64, {args.check_steps} steps: "
                      f"max param diff vs 1 device {diff:.1e}", flush=True)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python -m experiments.bench.scaling " + " ".join(sys.argv[1:]),
            "jax": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind, "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version(), "dtype": args.dtype,
            "model": f"mlp {args.features}-{args.width}-{args.width}-{args.classes}, relu, adam",
            "steps": args.steps, "warmup": args.warmup}
    with open(out / "scaling.json", "w", encoding="utf-8") as f:
        json.dump({"meta": meta, "rows": rows, "float64_checks": checks}, f, indent=1)
    with open(out / "scaling.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "scaling.md", "w", encoding="utf-8") as f:
        f.write(f"Step time of the hand-written training step, {meta['model']}, {args.dtype}, "
                f"{meta['backend']} ({meta['device_kind']}, {meta['device_count']} devices"
                f"{' emulated on ' + str(meta['cpu_count']) + ' cores' if meta['backend'] == 'cpu' else ''}); "
                f"median of {args.steps} steps.\n\n`{meta['command']}`\n\n")
        f.write("| mode | method | devices | global batch | per-device batch | median step (ms) "
                "| min step (ms) | compile + first (s) | max param diff vs 1 device |\n")
        f.write("|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
        for r in rows:
            f.write(f"| {r['mode']} | {r['method']} | {r['devices']} | {r['global_batch']} | "
                    f"{r['per_device_batch']} | {r['median_step_ms']:.3f} | {r['min_step_ms']:.3f} | "
                    f"{r['compile_and_first_s']:.2f} | {r['max_param_diff']:.1e} |\n")
        f.write(f"\n`max param diff` above: {args.dtype}, after {args.warmup + args.steps + 1} Adam steps "
                "(rounding differences in the order of the sums, amplified by Adam where gradients are tiny).\n")
        if checks:
            f.write(f"\nThe same comparison in float64 after {args.check_steps} Adam steps "
                    f"(global batch {args.batch}):\n\n| method | devices | max param diff vs 1 device |\n"
                    "|---|---:|---:|\n")
            for c in checks:
                f.write(f"| {c['method']} | {c['devices']} | {c['max_param_diff_float64']:.1e} |\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        fig, axes = plt.subplots(1, len(args.modes), figsize=(5 * len(args.modes), 3.6), squeeze=False)
        for ax, mode in zip(axes[0], args.modes):
            for method in args.methods:
                pts = [(r["devices"], r["median_step_ms"]) for r in rows
                       if r["mode"] == mode and r["method"] == method]
                ax.plot(*zip(*pts), "o-", label=method)
            base = [r for r in rows if r["mode"] == mode and r["method"] == "single-device jit"]
            if mode == "strong" and base:
                ax.axhline(base[0]["median_step_ms"], color="gray", ls="--", label="single-device jit")
            ax.set_xscale("log", base=2)
            ax.set_xticks(args.devices, [str(d) for d in args.devices])
            ax.set_xlabel("devices")
            ax.set_ylabel("median step time (ms)")
            ax.set_title(f"{mode} scaling" + (f" (B = {args.batch})" if mode == "strong"
                                              else f" ({args.per_device_batch} per device)"))
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "scaling.png", dpi=120)
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()

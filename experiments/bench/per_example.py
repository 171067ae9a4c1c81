"""Per-example gradient norms and a DP-SGD step: hand-written rules against jax.vmap(jax.grad) + optax.

Two networks (float32, random data of the right shapes):

* ``mlp``  -- MLP 784-512-512-10 (relu), batch 256, softmax cross-entropy;
* ``cnn``  -- the best MNIST-1D CNN ``cnn:c32k5-bn-relu-...-gap:pad=same`` with its four batch
  norms replaced by ``gn4`` (group norm, 4 groups): batch norm in training mode mixes the
  examples, so it has no per-example gradient and ``jaxprop.per_example`` refuses it (as
  Opacus does); batch 100, input (100, 40).

Contestants, each one jitted function:

* ``grad``      -- ``jp.value_and_grad(net, loss)``: the plain (summed) hand-written gradient,
  no per-example work. Per-example norms need every layer's dY, so they run this backward sweep
  (less the summed dW) plus a per-layer rule: ``vmap norms / grad`` is the most any such method
  can gain over ``jax.vmap(jax.grad)`` without recomputing the forward, the ceiling for the
  targets below;
* ``norms``     -- ``jp.per_example_grad_norms(net, loss)``: each layer's norms rule (dense:
  ||x_n||^2 ||dy_n||^2, conv: the taps' kernels, the tap Gram or the shifted Gram, by
  ``jaxprop.layers.conv._norms_form``);
* ``vmap norms`` -- ``jax.vmap(jax.grad(l_n))`` of the same forward (one example at a time, as
  one writes it in JAX; ``jaxprop.autodiff``), then the global norm of each example's gradient;
* ``dp step``   -- ``jp.dp_value_and_grad`` (norms sweep + one reweighted backward, no
  per-example gradient) + ``optax.sgd`` update;
* ``vmap+optax dp step`` -- ``jax.vmap(jax.grad(l_n))`` + ``optax.contrib.differentially_private_aggregate``
  + ``optax.sgd``, the same numbers (tests/test_per_example.py);
* ``hand pe + optax dp step`` -- ``jp.per_example_grads`` (materialized, hand rules) + the same
  optax aggregate: where the saving of the ghost norms comes from;
* ``norms, chunks of K`` / ``dp step, chunks of K`` (CNN only, K = ``--cnn-chunk``, default 20) --
  the same with ``chunk_size=K``: the batch's forward and sweeps run over sequential chunks of K
  examples (a ``lax.map`` / ``lax.scan``), so one chunk's caches are alive at a time. This is how
  a method that does not recompute the forward gets below ``grad``'s memory (the ceiling above).

Memory: XLA's compiled temporary bytes (``jit(f).lower(...).compile().memory_analysis()``).
Time: after warm-up, ``--rounds`` rounds; in each round every contestant of a pair runs
``--reps`` calls, the order alternating between rounds; a round gives the ratio of the two
medians; reported: the median ratio over rounds (pairing cancels the drift of a shared,
loaded machine), and each contestant's median time.

    python -m experiments.bench.per_example              # ~3-4 min on 2 busy cores
    python -m experiments.bench.per_example --rounds 3 --reps 2 --out /tmp/pe   # smoke

Writes ``experiments/bench/results/per_example.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from jaxprop import autodiff
from jaxprop.models import build_model

CNN_SPEC = "cnn:c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-c32k5-gn4-relu-gap:pad=same"
CLIP, SIGMA, LR = 1.0, 1.1, 0.1
TARGETS = {"memory": 5.0, "time": 2.0}       # vmap norms / hand norms (issue 13)


def problem(which):
    rng = np.random.default_rng(0)
    if which == "mlp":
        net, shape = build_model("mlp:512-512:relu", 10), (256, 784)
    else:
        net, shape = build_model(CNN_SPEC, 10), (100, 40)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, shape[0]), jnp.int32)
    _, params = net.init(jax.random.key(0), shape)
    params = jp.cast_floating(params, jnp.float32)
    return net, params, x, y


CHUNK = {"cnn": 20}      # examples per sequential chunk for the chunked contestants (the MLP needs none)


def contestants(net, chunk=None):
    loss = jp.softmax_cross_entropy()
    ad = autodiff.value_and_grad(net, loss)          # jax.value_and_grad of the same forward

    def vmap_grads(p, x, y):
        return jax.vmap(lambda xn, yn: ad(p, xn[None], yn[None])[1])(x, y)

    def vmap_norms(p, x, y):
        g = vmap_grads(p, x, y)
        return jnp.sqrt(sum((a.reshape(a.shape[0], -1) ** 2).sum(axis=1) for a in jax.tree_util.tree_leaves(g)))

    sgd = optax.sgd(LR)
    dp_hand = jp.dp_value_and_grad(net, loss, CLIP, SIGMA)
    pe_hand = jp.per_example_grads(net, loss)
    agg = optax.contrib.differentially_private_aggregate(CLIP, SIGMA, jax.random.key(1))

    def hand_step_with(dp):
        def step(p, x, y, key):
            _, g = dp(p, x, y, key)
            u, _ = sgd.update(g, sgd.init(p), p)
            return optax.apply_updates(p, u)
        return step

    hand_step = hand_step_with(dp_hand)

    def optax_step(grads_fn):
        def step(p, x, y, key):
            g, _ = agg.update(grads_fn(p, x, y), agg.init(p)._replace(rng_key=key))
            u, _ = sgd.update(g, sgd.init(p), p)
            return optax.apply_updates(p, u)
        return step

    chunked = {} if chunk is None else {
        f"norms, chunks of {chunk}": (jp.per_example_grad_norms(net, loss, chunk_size=chunk), False),
        f"dp step, chunks of {chunk}": (hand_step_with(jp.dp_value_and_grad(net, loss, CLIP, SIGMA, chunk_size=chunk)),
                                        True)}
    return chunked | {
        "grad": (jp.value_and_grad(net, loss), False),
        "norms": (jp.per_example_grad_norms(net, loss), False),
        "vmap norms": (vmap_norms, False),
        "dp step": (hand_step, True),
        "vmap+optax dp step": (optax_step(vmap_grads), True),
        "hand pe + optax dp step": (optax_step(pe_hand), True),
    }


PAIRS = [("norms", "vmap norms"), ("grad", "vmap norms"), ("dp step", "vmap+optax dp step"), ("dp step", "hand pe + optax dp step")]


def pairs(chunk=None):
    """The PAIRS, and with a chunk size the chunked norms and DP step against vmap's."""
    if chunk is None:
        return PAIRS
    return PAIRS[:1] + [(f"norms, chunks of {chunk}", "vmap norms")] + PAIRS[1:3] + [
        (f"dp step, chunks of {chunk}", "vmap+optax dp step")] + PAIRS[3:]


def temp_bytes(fn, args):
    return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def bench_model(which, rounds, reps, chunk=None):
    net, params, x, y = problem(which)
    fns = contestants(net, chunk)
    prs = pairs(chunk)
    key = jax.random.key(2)
    args = {name: (params, x, y, key) if with_key else (params, x, y) for name, (_, with_key) in fns.items()}
    jitted = {name: jax.jit(fn) for name, (fn, _) in fns.items()}
    memory = {name: temp_bytes(fn, args[name]) for name, (fn, _) in fns.items()}
    # same numbers first: the hand norms equal vmap's, the DP steps agree
    n_hand, n_vmap = (np.asarray(jitted[k](*args[k])) for k in ("norms", "vmap norms"))
    dps = [jitted[k](*args[k]) for k in ("dp step", "vmap+optax dp step")]
    err_norms = float(np.max(np.abs(n_hand - n_vmap)) / np.max(np.abs(n_vmap)))
    with jax.enable_x64(True):                       # the float64 truth of the same float32 problem
        p64 = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        truth = np.asarray(jax.jit(fns["norms"][0])(p64, jnp.asarray(np.asarray(x, np.float64)), y), np.float64)
    rel = {k: np.abs(v - truth) / truth for k, v in (("norms", n_hand), ("vmap norms", n_vmap))}
    err_truth = {k: float(np.max(v)) for k, v in rel.items()}
    err_truth_median = {k: float(np.median(v)) for k, v in rel.items()}
    err_dp = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / max(float(np.max(np.abs(np.asarray(b)))), 1e-30))
                 for a, b in zip(jax.tree_util.tree_leaves(dps[0]), jax.tree_util.tree_leaves(dps[1])))
    for name in jitted:                              # warm-up
        jax.block_until_ready(jitted[name](*args[name]))

    def once(name):
        t = time.perf_counter()
        jax.block_until_ready(jitted[name](*args[name]))
        return time.perf_counter() - t

    ratios = {pair: [] for pair in prs}
    times = {name: [] for name in jitted}
    for r in range(rounds):
        for pair in prs:
            order = pair if r % 2 == 0 else pair[::-1]
            med = {}
            for name in order:
                ts = [once(name) for _ in range(reps)]
                times[name].extend(ts)
                med[name] = statistics.median(ts)
            ratios[pair].append(med[pair[1]] / med[pair[0]])
    n_params = int(sum(a.size for a in jax.tree_util.tree_leaves(params)))
    return {
        "model": which, "net": net.name, "batch": int(x.shape[0]), "n_params": n_params,
        "temp_bytes": memory,
        "median_time_s": {k: statistics.median(v) for k, v in times.items()},
        "time_ratio": {f"{b} / {a}": {"median": statistics.median(v), "q1": float(np.percentile(v, 25)),
                                      "q3": float(np.percentile(v, 75)), "rounds": v}
                       for (a, b), v in ratios.items()},
        "memory_ratio": {f"{b} / {a}": memory[b] / max(memory[a], 1) for a, b in prs},
        "rel_err_norms_vs_vmap": err_norms, "rel_err_dp_step_vs_optax": err_dp,
        "max_rel_err_vs_float64_truth": err_truth, "median_rel_err_vs_float64_truth": err_truth_median,
    }


def _mb(b):
    return f"{b / 2**20:.1f} MiB"


def markdown(results, meta):
    lines = ["# Per-example gradient norms and DP-SGD: hand-written rules vs jax.vmap(jax.grad) + optax", "",
             f"`{meta['command']}` -- {meta['machine']}, jax {meta['jax']}, float32, "
             f"{meta['rounds']} rounds x {meta['reps']} calls, load average {meta['load']}.", "",
             "CNN: the best MNIST-1D CNN with `gn4` (group norm) in place of `bn`: batch norm in training mode "
             "mixes examples, so it has no per-example gradient (jaxprop refuses it, as Opacus does).", "",
             "| model | batch | contestant | XLA temp memory | median time |", "|---|---:|---|---:|---:|"]
    for r in results:
        for name, b in r["temp_bytes"].items():
            lines.append(f"| {r['model']} | {r['batch']} | {name} | {_mb(b)} | {1e3 * r['median_time_s'][name]:.2f} ms |")
    lines += ["", "| model | ratio | memory | time (median over rounds, IQR) | target |", "|---|---|---:|---:|---|"]
    for r in results:
        for k, m in r["memory_ratio"].items():
            t = r["time_ratio"][k]
            target = (f"memory >= {TARGETS['memory']:.0f}x: {'met' if m >= TARGETS['memory'] else 'NOT met'}; "
                      f"time >= {TARGETS['time']:.0f}x: {'met' if t['median'] >= TARGETS['time'] else 'NOT met'}"
                      if k.startswith("vmap norms / norms") else "")
            lines.append(f"| {r['model']} | {k} | {m:.1f}x | {t['median']:.2f}x ({t['q1']:.2f}-{t['q3']:.2f}) | {target} |")
    lines += ["", "`vmap norms / grad` is the ceiling of `vmap norms / norms`: per-example norms need each "
              "layer's dY, so they run the plain backward sweep (less its summed dW) plus a per-layer rule; no "
              "method that runs the backward without recomputing the forward can use less memory or time than `grad` "
              "itself."]
    lines += ["", "Same numbers: " + "; ".join(
        f"{r['model']}: norms vs vmap rel. err {r['rel_err_norms_vs_vmap']:.1e}, DP step vs optax "
        f"{r['rel_err_dp_step_vs_optax']:.1e}" for r in results) + " (float32)."]
    lines += ["", "Against the float64 truth of the same float32 problem (relative error of the norm, max and "
              "median over examples): " + "; ".join(
                  f"{r['model']}: hand norms {r['max_rel_err_vs_float64_truth']['norms']:.1e} "
                  f"({r['median_rel_err_vs_float64_truth']['norms']:.1e}), vmap norms "
                  f"{r['max_rel_err_vs_float64_truth']['vmap norms']:.1e} "
                  f"({r['median_rel_err_vs_float64_truth']['vmap norms']:.1e})" for r in results)
              + ". A max far above the median is a kink, not inaccuracy: an example with a ReLU input within "
              "float32 rounding of 0 can take the other branch in float64 (its gradient is discontinuous there), "
              "in either float32 method."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="mlp,cnn")
    p.add_argument("--cnn-chunk", type=int, default=CHUNK["cnn"], help="chunk size of the chunked CNN contestants")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    results = []
    for which in args.models.split(","):
        t = time.time()
        results.append(bench_model(which, args.rounds, args.reps, args.cnn_chunk if which == "cnn" else None))
        print(f"{which}: {time.time() - t:.0f} s", flush=True)
    argv = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["python -m experiments.bench.per_example"] + list(argv)),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "jax": jax.__version__,
            "devices": str(jax.devices()), "rounds": args.rounds, "reps": args.reps,
            "load": " ".join(f"{v:.1f}" for v in os.getloadavg())}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "per_example.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1, default=str)
    md = markdown(results, meta)
    with open(os.path.join(args.out, "per_example.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()

"""Step time of a CNN with hand-written gradients against jax.grad's, in the same process.

Both steps are the runner's jitted training step (gradient, Adam update) on the same
network, batch and parameters; they differ only in the gradient function
(``jp.value_and_grad`` vs ``jaxprop.autodiff.value_and_grad``). After warm-up the two are
timed in pairs, alternating which goes first, and the median of the per-pair ratios
hand / autodiff is reported (pairing cancels drifts in machine load, which on a shared
machine are larger than the difference being measured).

    python -m experiments.bench.cnn_step_time                 # the best MNIST-1D CNN
    python -m experiments.bench.cnn_step_time --model "cnn:c25k5s2p1-relu-c25k3s2p1-relu-c25k3s2p1-relu"

Writes ``experiments/bench/results/cnn_step_time[-TAG].json`` (``--tag``) and prints the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from jaxprop import autodiff
from jaxprop.runner.models import build_model
from jaxprop.train import make_train_step
from experiments.bench import benchmark as bm

BEST = "cnn:c32k5-bn-relu-c32k5-bn-relu-c32k5-bn-relu-c32k5-bn-relu-gap:pad=same"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=BEST)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--length", type=int, default=40, help="signal length (MNIST-1D: 40)")
    ap.add_argument("--pairs", type=int, default=200, help="timed (hand, autodiff) pairs")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--tag", default="")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)

    net = build_model(args.model, 10)
    loss = jp.softmax_cross_entropy()
    tx = optax.adam(1e-3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((args.batch_size, args.length)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch_size))
    _, params = net.init(jax.random.key(0), x.shape)
    state = jp.init_state(net, x.shape)
    opt_state = tx.init(params)
    kw = {}
    if net.stateful:
        kw["state"] = state
    if net.stochastic:
        kw["key"] = jax.random.key(1)

    steps = {name: make_train_step(fn(net, loss), tx, net=net, donate=False)
             for name, fn in (("hand", jp.value_and_grad), ("autodiff", autodiff.value_and_grad))}

    def run(name):
        t = time.perf_counter()
        out = steps[name](params, opt_state, x, y, **kw)
        jax.block_until_ready(out)
        return time.perf_counter() - t

    # the two paths give the same gradients at the same point
    g_h = jax.jit(lambda p: jp.value_and_grad(net, loss)(p, x, y, **kw)[1])(params)
    g_a = jax.jit(lambda p: autodiff.value_and_grad(net, loss)(p, x, y, **kw)[1])(params)
    diff = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in
               zip(jax.tree_util.tree_leaves(g_h), jax.tree_util.tree_leaves(g_a)))
    times, ratios = bm.alternating_pairs(run, ("hand", "autodiff"), pairs=args.pairs, warmup=args.warmup)
    q = statistics.quantiles(ratios, n=4)
    res = {"model": args.model, "batch_size": args.batch_size, "length": args.length, "pairs": args.pairs,
           "n_params": int(sum(a.size for a in jax.tree_util.tree_leaves(params))),
           "median_step_ms_hand": 1e3 * statistics.median(times["hand"]),
           "median_step_ms_autodiff": 1e3 * statistics.median(times["autodiff"]),
           "median_ratio_hand_over_autodiff": statistics.median(ratios),
           "ratio_quartiles": [q[0], q[2]],
           "max_rel_grad_diff_float32": diff,
           "device": f"{jax.default_backend()} x{jax.device_count()}", "jax_version": jax.__version__}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cnn_step_time{'-' + args.tag if args.tag else ''}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps(res, indent=2))
    print(path)
    return res


if __name__ == "__main__":
    main()

"""A/B: what relu keeps for its backward pass, timed in the full jitted training step.

Three steps of the same MLP (depth x (dense(W), relu), dense(10), softmax
cross-entropy, SGD, donated buffers), interleaved in one process:

    mask    jp.relu()                 caches the boolean x > 0 (the default)
    output  jp.relu(save="output")    caches y; the pre-activation dies in the forward pass
    ad      jax.value_and_grad of the same forward

and reports, per size, the median over rounds of the per-round time ratio
against ``ad`` (with quartiles) and XLA's memory figure of each step. Run it
with ``taskset -c 0`` too: on one core XLA's CPU runtime cannot run independent
kernels concurrently, which is what separates the two caches.

    python experiments/relu_cache_ab.py                       # the default sizes
    python experiments/relu_cache_ab.py --size 1024 64 8 --rounds 40
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402  (the benchmark's step, contestant, timing and memory helpers)
import jaxprop as jp  # noqa: E402

VARIANTS = ("mask", "output", "ad")
DEFAULT_SIZES = [(128, 256, 2), (128, 256, 4), (1024, 64, 2), (1024, 64, 8), (1024, 256, 2), (128, 1024, 2)]


def mlp(width, depth, save):
    return jp.serial(*[jp.serial(jp.dense(width), jp.relu(save=save)) for _ in range(depth)],
                     jp.dense(bm.N_CLASSES))


def one_size(batch, width, depth, rounds, min_block_s):
    loss, tx = jp.softmax_cross_entropy(), optax.sgd(bm.LR)
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, bm.N_CLASSES)
    fns = {}
    for save in ("mask", "output"):
        net = mlp(width, depth, save)
        fns[save], ad = bm.gradient_fns(net, loss)
        fns.setdefault("ad", ad)
    params = jax.jit(lambda k: mlp(width, depth, "mask").init(k, (batch, width))[1])(k_init)
    contestants, mem = {}, {}
    for name in VARIANTS:
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        compiled, _, footprint, _, _ = bm.compile_stats(bm.make_step(fns[name], tx), (p, s, x, y))
        contestants[name] = bm.JaxContestant(compiled, p, s, x, y)
        mem[name] = footprint / 2 ** 20
    k = bm.calibrate(contestants["ad"], min_block_s)
    times = {n: [] for n in VARIANTS}
    for r in range(rounds):
        order = list(VARIANTS[r % 3:] + VARIANTS[:r % 3])
        for n in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            contestants[n].run(k)
            times[n].append((time.perf_counter() - t0) / k)
    row = {"size": f"{batch} {width} {depth}", "ad_ms": statistics.median(times["ad"]) * 1e3}
    for n in ("mask", "output"):
        row[n] = bm.ratio_stats(times[n], times["ad"])
        row[f"mem_{n}"] = mem[n] / mem["ad"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, action="append", metavar=("B", "W", "D"),
                    help="batch, width, depth (repeatable; default: six sizes of the benchmark sweep)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--min-block-s", type=float, default=0.05)
    ap.add_argument("--out", help="append the Markdown table to this file")
    args = ap.parse_args(argv)
    head = (f"jax {jax.__version__}, {jax.default_backend()}, {bm.usable_cores()} core(s) usable, {args.rounds} rounds, "
            f"load at start {os.getloadavg()[0]:.2f}")
    lines = [head, "", "| B W D | jax.grad ms | mask / jax.grad med [q25, q75] | output / jax.grad med [q25, q75] "
             "| memory mask / output vs jax.grad |", "|---|---|---|---|---|"]
    print(head, flush=True)
    for b, w, d in args.size or DEFAULT_SIZES:
        r = one_size(b, w, d, args.rounds, args.min_block_s)
        cell = lambda s: f"{s['med']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}]"
        lines.append(f"| {r['size']} | {r['ad_ms']:.2f} | {cell(r['mask'])} | {cell(r['output'])} | "
                     f"{r['mem_mask']:.3f} / {r['mem_output']:.3f} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

"""A/B: dropout's cache, the mask (``save_mask=True``, the default) or only the key (``False``).

Three jitted training steps of the same MLP, depth x (dense(W), relu, dropout(0.5)), dense(10),
softmax cross-entropy, SGD, donated buffers, a fresh key per call, interleaved in one process:

    mask   jp.dropout(0.5)                   caches the boolean mask
    key    jp.dropout(0.5, save_mask=False)  caches the key; the backward pass draws the mask again
    ad     jax.value_and_grad of the same forward

Per size: the median over rounds of the per-round ratios key / mask, mask / ad and key / ad, in
wall time and in process CPU time (which waiting for a core taken by other jobs does not count),
with interquartile ranges and verdicts (``faster`` / ``slower`` only when the IQR excludes 1), and
XLA's compiled memory of each step (temporaries, and the footprint).

    python -m experiments.bench.dropout_mask                 # 4 sizes, ~4 min on 2 busy cores
    python -m experiments.bench.dropout_mask --size 1024 256 4 --rounds 20

Writes ``experiments/bench/results/dropout_mask.md``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import optax

import jaxprop as jp
from experiments.bench import benchmark as bm

VARIANTS = ("mask", "key", "ad")
RATIOS = (("key", "mask"), ("mask", "ad"), ("key", "ad"))
DEFAULT_SIZES = [(128, 256, 4), (1024, 64, 8), (1024, 256, 4), (1024, 1024, 2)]
RATE = 0.5


def mlp(width, depth, save_mask):
    blocks = [jp.serial(jp.dense(width), jp.relu(), jp.dropout(RATE, save_mask=save_mask)) for _ in range(depth)]
    return jp.serial(*blocks, jp.dense(bm.N_CLASSES))


class KeyedContestant:
    """A compiled step taking a key; a new key per step (fold_in of the step count)."""

    def __init__(self, compiled, params, opt_state, x, y):
        self.compiled, self.x, self.y = compiled, x, y
        self.params, self.opt_state, self.i = params, opt_state, 0
        self.keys = jax.random.split(jax.random.key(1), 64)

    def run(self, k):
        p, s, v = self.params, self.opt_state, None
        for _ in range(k):
            p, s, v = self.compiled(p, s, self.x, self.y, self.keys[self.i % 64])
            self.i += 1
        v.block_until_ready()
        self.params, self.opt_state = p, s
        return v


def make_step(vg, tx):
    def step(params, opt_state, x, y, key):
        value, grads = vg(params, x, y, key=key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return jax.jit(step, donate_argnums=(0, 1))


def one_size(batch, width, depth, rounds, min_block_s):
    loss, tx = jp.softmax_cross_entropy(), optax.sgd(bm.LR)
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, bm.N_CLASSES)
    params = jp.cast_floating(jax.jit(lambda k: mlp(width, depth, True).init(k, x.shape)[1])(k_init), jnp.float32)
    contestants, foot, temp = {}, {}, {}
    for name in VARIANTS:
        hand, ad = bm.gradient_fns(mlp(width, depth, name != "key"), loss)
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        compiled, _, footprint, _, _ = bm.compile_stats(make_step(ad if name == "ad" else hand, tx),
                                                        (p, s, x, y, jax.random.key(1)))
        contestants[name] = KeyedContestant(compiled, p, s, x, y)
        foot[name], temp[name] = footprint, bm.temp_bytes(compiled)
    # the two caches compute the same step (same masks): equal losses
    v = {n: float(contestants[n].run(1)) for n in ("mask", "key")}
    k = bm.calibrate(contestants["ad"], min_block_s)
    cpu = {}
    wall = bm.interleaved(contestants, k, rounds, pair=("mask", "key"), subs=bm.SUBS, cpu=cpu)
    row = {"size": f"{batch} {width} {depth}", "ms": {n: 1e3 * statistics.median(t) for n, t in wall.items()},
           "loss_diff": abs(v["mask"] - v["key"]), "foot": foot, "temp": temp}
    for a, b in RATIOS:
        for what, t in (("wall", wall), ("cpu", cpu)):
            st = bm.ratio_stats(t[a], t[b])
            st["verdict"] = bm.verdict(st["q25"], st["q75"])
            row[f"{a}/{b} {what}"] = st
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, action="append", metavar=("B", "W", "D"))
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--min-block-s", type=float, default=0.1)
    ap.add_argument("--out", default=os.path.join(bm.RESULTS, "dropout_mask.md"))
    args = ap.parse_args(argv)
    env = bm.environment(False)
    cell = lambda s: f"{s['med']:.3f} [{s['q25']:.3f}, {s['q75']:.3f}] {s['verdict']}"
    lines = ["# dropout: caching the mask or only the key", "",
             "Reproduce: `python -m experiments.bench.dropout_mask" + (" " + " ".join(argv) if argv else "") + "`", ""]
    lines += env + [f"- {args.rounds} rounds per size; a ratio is per round (blocks back to back, the two caches "
                    "adjacent in alternating order); verdict `faster`/`slower` only when the IQR excludes 1", "",
                    "| B W D | mask ms | key / mask, wall | key / mask, CPU | mask / jax.grad, wall | key / jax.grad, wall | "
                    "temp key / mask | temp mask / jax.grad | footprint key / mask | loss diff |",
                    "|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for b, w, d in args.size or DEFAULT_SIZES:
        r = one_size(b, w, d, args.rounds, args.min_block_s)
        lines.append(f"| {r['size']} | {r['ms']['mask']:.2f} | {cell(r['key/mask wall'])} | {cell(r['key/mask cpu'])} | "
                     f"{cell(r['mask/ad wall'])} | {cell(r['key/ad wall'])} | {r['temp']['key'] / r['temp']['mask']:.3f} | "
                     f"{r['temp']['mask'] / r['temp']['ad']:.3f} | {r['foot']['key'] / r['foot']['mask']:.3f} | "
                     f"{r['loss_diff']:.1e} |")
        print(lines[-1], flush=True)
    lines.append(f"\n- load average at end (1, 5, 15 min): {bm._load()}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""A/B: what relu keeps for its backward pass, timed in the full jitted training step.

Four steps of the same MLP (depth x (dense(W), relu), dense(10), softmax
cross-entropy, SGD, donated buffers), interleaved in one process:

    mask        jp.relu()                 caches the boolean x > 0 (the default)
    output      jp.relu(save="output")    caches y; the pre-activation dies in the forward pass
    mask_plain  relu caching the mask with the plain forward where(x > 0, x, 0) (NaN -> 0),
                i.e. jp.relu() before it kept NaN (2 ops per element in the forward, not 4)
    ad          jax.value_and_grad of the default relu's forward

Per size it reports the median over rounds of the per-round time ratios
output / mask (the decision), mask / ad, output / ad and mask / mask_plain
(the cost of keeping NaN), each with its interquartile range, and XLA's
memory of each step (temporaries, and the whole footprint).

The driver runs the sweep in several separate processes (a median from one
process can differ from another's by more than its quartiles: buffer
addresses, thread placement, load), pinned to one core (``taskset -c 0``,
where XLA's CPU runtime cannot overlap independent kernels) and on two cores,
appends every process's rows to a JSON-lines file and writes the summary:

    python -m experiments.bench.relu_cache_ab                       # 3 processes x {1, 2} cores, ~25 min at load 10
    python -m experiments.bench.relu_cache_ab --processes 1 --cores 2 --size 1024 64 8 --rounds 20
    python -m experiments.bench.relu_cache_ab --summarize experiments/bench/results/relu_cache_ab.jsonl

Writes ``experiments/bench/results/relu_cache_ab.{jsonl,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprop as jp
from experiments.bench import benchmark as bm   # the benchmark's step, contestant, timing and memory helpers

VARIANTS = ("mask", "output", "mask_plain", "ad")
RATIOS = (("output", "mask"), ("mask", "ad"), ("output", "ad"), ("mask", "mask_plain"))
DEFAULT_SIZES = [(b, w, d) for b in (128, 1024) for w in (64, 256, 1024) for d in (2, 8)] + [(128, 2048, 2)]
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def relu_plain() -> jp.Layer:
    """relu with the mask cache and the forward where(x > 0, x, 0) (NaN -> 0): 2 ops per element."""
    zero = lambda a: jnp.zeros((), a.dtype)

    def fn(x):
        mask = x > 0
        return jnp.where(mask, x, zero(x)), mask
    return jp.elementwise("relu_plain", fn, lambda mask, dy: jnp.where(mask, dy, zero(dy)))


def mlp(width, depth, variant):
    act = {"mask": lambda: jp.relu(), "output": lambda: jp.relu(save="output"),
           "mask_plain": relu_plain, "ad": lambda: jp.relu()}[variant]
    return jp.serial(*[jp.serial(jp.dense(width), act()) for _ in range(depth)], jp.dense(bm.N_CLASSES))


def one_size(batch, width, depth, rounds, min_block_s):
    loss, tx = jp.softmax_cross_entropy(), optax.sgd(bm.LR)
    k_init, k_x, k_y = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k_x, (batch, width), jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, bm.N_CLASSES)
    params = jax.jit(lambda k: mlp(width, depth, "mask").init(k, (batch, width))[1])(k_init)
    params = jp.cast_floating(params, jnp.float32)
    contestants, mem, temp = {}, {}, {}
    for name in VARIANTS:
        hand, ad = bm.gradient_fns(mlp(width, depth, name), loss)
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        step = bm.make_step(ad if name == "ad" else hand, tx)
        compiled, _, footprint, _, _ = bm.compile_stats(step, (p, s, x, y))
        temp[name] = int(compiled.memory_analysis().temp_size_in_bytes)
        contestants[name] = bm.JaxContestant(compiled, p, s, x, y)
        mem[name] = footprint
    k = bm.calibrate(contestants["ad"], min_block_s)
    if k == 1:                                   # one step outlasts the block: half the rounds
        rounds = max(6, rounds // 2)
    times = {n: [] for n in VARIANTS}
    cpu = {n: [] for n in VARIANTS}                 # process CPU time: not the waiting for a shared core
    for r in range(rounds):
        order = list(VARIANTS[r % 4:] + VARIANTS[:r % 4])
        for n in (order if r % 2 == 0 else order[::-1]):
            t0, c0 = time.perf_counter(), time.process_time()
            contestants[n].run(k)
            times[n].append((time.perf_counter() - t0) / k)
            cpu[n].append((time.process_time() - c0) / k)
    row = {"batch": batch, "width": width, "depth": depth, "rounds": rounds, "steps_per_block": k,
           "ms": {n: 1e3 * statistics.median(t) for n, t in times.items()},
           "footprint_bytes": mem, "temp_bytes": temp,
           "ratios": {f"{a}/{b}": list(np.asarray(times[a]) / np.asarray(times[b])) for a, b in RATIOS},
           "cpu_ratios": {f"{a}/{b}": list(np.asarray(cpu[a]) / np.asarray(cpu[b])) for a, b in RATIOS}}
    return row


def run_process(args):
    """One process: the sweep, each size's row appended to ``args.jsonl``."""
    meta = {"run": args.run_id or f"{os.getpid()}", "cores": bm.usable_cores(), "command": args.command,
            "load_start": os.getloadavg()[0], "jax": jax.__version__, "backend": jax.default_backend()}
    for b, w, d in args.size or DEFAULT_SIZES:
        row = one_size(b, w, d, args.rounds, args.min_block_s)
        row.update(meta, load=os.getloadavg()[0])
        with open(args.jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")
        med = {k: statistics.median(v) for k, v in row["ratios"].items()}
        print(f"[{meta['run']}, {meta['cores']} core(s)] B={b} W={w} D={d}  "
              + "  ".join(f"{k} {v:.3f}" for k, v in med.items())
              + f"  temp output/mask {row['temp_bytes']['output'] / max(row['temp_bytes']['mask'], 1):.3f}",
              flush=True)


def _q(v):
    q25, q50, q75 = np.percentile(v, [25, 50, 75])
    return float(q50), float(q25), float(q75)


def summarize(jsonl, out_md, command):
    rows = [json.loads(line) for line in open(jsonl) if line.strip()]
    cores = sorted({r["cores"] for r in rows})
    sizes = sorted({(r["batch"], r["width"], r["depth"]) for r in rows})
    loads = [r["load"] for r in rows]
    made = rows[0].get("command") or command
    lines = ["# relu's cache: mask (default) vs output, and the cost of keeping NaN", "",
             f"Reproduce: `{made}`" + (f" (this summary: `{command}`)" if made != command else ""), "",
             f"- jax {rows[0]['jax']}, backend {rows[0]['backend']}, {os.cpu_count()} CPU cores on the machine; "
             f"{len({r['run'] for r in rows})} processes; load average (1 min) during the runs "
             f"{min(loads):.1f}-{max(loads):.1f} (the machine was shared with other agents' jobs)",
             "- per process and size: R rounds of one block of each variant in a rotating order; a ratio is "
             "per round (the two blocks of a round ran within a few hundred ms of each other)",
             "- cell: median over processes of each process's median ratio; brackets: the interquartile range "
             "of all rounds of all processes pooled; `(a-b)`: the range of the per-process medians",
             "- verdict on output / mask: `output faster` / `output slower` when the pooled IQR excludes 1, else `tie`",
             "- memory: XLA's compiled temporaries of the step, output over mask (and mask over jax.grad)", ""]
    summary = {}
    for c in cores:
        lines += [f"## {c} core{'s' if c > 1 else ''}" + (" (`taskset -c 0`)" if c == 1 else ""), "",
                  "| B W D | jax.grad ms | output / mask | verdict | mask / jax.grad | output / jax.grad | "
                  "mask / mask_plain (NaN cost) | temp output / mask | temp mask / jax.grad |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for s in sizes:
            rs = [r for r in rows if r["cores"] == c and (r["batch"], r["width"], r["depth"]) == s]
            if not rs:
                continue
            cells, verdict = [], ""
            for key in ("output/mask", "mask/ad", "output/ad", "mask/mask_plain"):
                per = [statistics.median(r["ratios"][key]) for r in rs]
                pooled = [v for r in rs for v in r["ratios"][key]]
                _, q25, q75 = _q(pooled)
                med = statistics.median(per)
                rng = f" ({min(per):.3f}-{max(per):.3f})" if len(per) > 1 else ""
                cells.append(f"{med:.3f} [{q25:.3f}, {q75:.3f}]{rng}")
                if key == "output/mask":
                    verdict = "output faster" if q75 < 1 else "output slower" if q25 > 1 else "tie"
                    summary[(c, s)] = (med, q25, q75, verdict)
            t = rs[0]["temp_bytes"]
            ad_ms = statistics.median(r["ms"]["ad"] for r in rs)
            lines.append(f"| {s[0]} {s[1]} {s[2]} | {ad_ms:.2f} | {cells[0]} | {verdict} | {cells[1]} | {cells[2]} | "
                         f"{cells[3]} | {t['output'] / max(t['mask'], 1):.3f} | {t['mask'] / max(t['ad'], 1):.3f} |")
        lines.append("")
        with_cpu = [r for r in rows if r["cores"] == c and "cpu_ratios" in r]
        if with_cpu:
            lines += [f"Process CPU time (all threads; the time spent waiting for a core that another job holds "
                      f"does not count), from the {len({r['run'] for r in with_cpu})} process(es) that recorded it:", "",
                      "| B W D | output / mask | verdict | mask / jax.grad | output / jax.grad | mask / mask_plain |",
                      "|---|---|---|---|---|---|"]
            for s in sizes:
                rs = [r for r in with_cpu if (r["batch"], r["width"], r["depth"]) == s]
                if not rs:
                    continue
                cells = []
                for key in ("output/mask", "mask/ad", "output/ad", "mask/mask_plain"):
                    pooled = [v for r in rs for v in r["cpu_ratios"][key]]
                    med, q25, q75 = _q(pooled)
                    cells.append(f"{med:.3f} [{q25:.3f}, {q75:.3f}]")
                    if key == "output/mask":
                        v = "output faster" if q75 < 1 else "output slower" if q25 > 1 else "tie"
                        summary[("cpu", c, s)] = (med, q25, q75, v)
                        cells.append(v)
                lines.append(f"| {s[0]} {s[1]} {s[2]} | " + " | ".join(cells) + " |")
            lines.append("")
    verdicts = ("output faster", "tie", "output slower")
    lines += ["## Tally (output / mask)", ""]
    for c in cores:
        wall = [x[3] for k, x in summary.items() if len(k) == 2 and k[0] == c]
        cpu = [x[3] for k, x in summary.items() if len(k) == 3 and k[1] == c]
        lines.append(f"- {c} core(s), wall: " + ", ".join(f"{v}: {wall.count(v)}" for v in verdicts)
                     + ("; CPU time: " + ", ".join(f"{v}: {cpu.count(v)}" for v in verdicts) if cpu else ""))
    with open(out_md, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, nargs=3, action="append", metavar=("B", "W", "D"),
                    help="batch, width, depth (repeatable; default: 13 sizes of the benchmark sweep)")
    ap.add_argument("--rounds", type=int, default=16, help="rounds per size (halved where one step outlasts a block)")
    ap.add_argument("--min-block-s", type=float, default=0.1)
    ap.add_argument("--processes", type=int, default=3, help="separate processes per core count")
    ap.add_argument("--cores", type=int, nargs="+", default=[1, 2], help="1: taskset -c 0; 2: unpinned")
    ap.add_argument("--jsonl", default=os.path.join(RESULTS, "relu_cache_ab.jsonl"))
    ap.add_argument("--md", default=os.path.join(RESULTS, "relu_cache_ab.md"))
    ap.add_argument("--append", action="store_true", help="keep the rows already in --jsonl")
    ap.add_argument("--summarize", metavar="JSONL", help="only write the summary of an existing file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--command", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    command = "python -m experiments.bench.relu_cache_ab " + " ".join(
        a for a in argv if a not in ("--worker",))
    if args.worker:
        return run_process(args)
    if args.summarize:
        return summarize(args.summarize, args.md, command)
    os.makedirs(os.path.dirname(args.jsonl), exist_ok=True)
    if not args.append and os.path.exists(args.jsonl):
        os.remove(args.jsonl)
    passthrough = ["--rounds", str(args.rounds), "--min-block-s", str(args.min_block_s), "--jsonl", args.jsonl]
    for s in args.size or []:
        passthrough += ["--size"] + [str(v) for v in s]
    for i in range(args.processes):                 # interleave the core counts process by process
        for c in args.cores:
            pin = ["taskset", "-c", "0"] if c == 1 else []
            cmd = pin + [sys.executable, "-m", "experiments.bench.relu_cache_ab", "--worker",
                         "--run-id", f"p{i}-{c}c", "--command", command] + passthrough
            subprocess.run(cmd, check=True)
    return summarize(args.jsonl, args.md, command)


if __name__ == "__main__":
    main()

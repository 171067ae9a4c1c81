"""Benchmark: the jitted training step with hand-written gradients against jax.grad and PyTorch.

For every size of the sweep, in one process and interleaved (A, B, C, A, B, C
in a rotating order), it times the full jitted training step

    value, grads = gradient(params, x, y)          # hand: jp.value_and_grad(net, loss)
    updates, opt_state = sgd.update(grads, ...)      # ad:   jax.value_and_grad of the same forward
    params = optax.apply_updates(params, updates)    # (params and optimizer state donated)

and, when PyTorch is installed, the same network's eager step (zero_grad,
forward, backward, SGD step). Each measurement is a block of k steps; a round
is one block of each contestant, with the hand-written and jax.grad steps back
to back at its end in alternating order (so both follow the other contestants
equally often); the report gives the median over rounds of the per-round
ratio hand / jax.grad (and hand / PyTorch) with its spread
(quartiles, min-max). Because both sides of a ratio run back to back, a
machine shared with other work slows both alike; the absolute times are
less trustworthy than the ratios.

Also per size: achieved GFLOP/s of the step (GEMM flops of forward and
backward, counted analytically, cross-checked with XLA's cost analysis)
against a GEMM peak measured in the same rounds (a square float32 jnp.dot
timed interleaved with the steps, so load from other work affects both), and
against a GEMM of the step's own shape (B, W) @ (W, W) timed the same way; compile time (lower + compile) of both steps; peak memory from
XLA's compiled memory analysis. A compile-time study compares
``repeat(dense+relu, n)`` with ``serial`` of the same blocks.

Writes CSV + Markdown to experiments/bench/results/ (``benchmark.*``, or
``benchmark_quick.*`` with --quick; ``--out``, ``--prefix``) and prints the table.

    python -m experiments.bench.benchmark --quick     # < 1 minute
    python -m experiments.bench.benchmark             # the full sweep (long on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import csv
import datetime
import math
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

# PyTorch's OpenMP workers busy-wait after each parallel region and then starve XLA's threads
# (and the reverse) in the interleaved timing; measured here: 161 ms -> 12 ms per PyTorch step at
# B=1024, W=256 on 2 cores. Passive waiting keeps the comparison fair. Set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
N_CLASSES = 10
LR = 1e-3


# ----------------------------------------------------------------------------- models

def mlp(width: int, depth: int, *, use_repeat: bool = False) -> jp.Layer:
    """depth x (dense(width), relu), then dense(10). Input features = width.

    serial uses relu's default cache (the mask); repeat blocks use
    ``relu(save="output")``, which its loop stores without a per-step copy."""
    if use_repeat:
        body = jp.repeat(jp.serial(jp.dense(width), jp.relu(save="output")), depth)
    else:
        body = jp.serial(*[jp.serial(jp.dense(width), jp.relu()) for _ in range(depth)])
    return jp.serial(body, jp.dense(N_CLASSES))


def mlp_flops(batch, width, depth):
    """GEMM flops of one step: forward x W (2BIO per dense), backward dW (2BIO)
    and dx (2BIO, not for the first layer, whose input needs no gradient)."""
    dims = [(width, width)] * depth + [(width, N_CLASSES)]
    fwd = sum(2 * batch * i * o for i, o in dims)
    return 3 * fwd - 2 * batch * dims[0][0] * dims[0][1]


CNN_LEN, CNN_CH, CNN_K = 64, 32, 5


def cnn() -> jp.Layer:
    """1-D CNN on (N, 64, 1): 3 x [conv1d(32, 5, stride 2, SAME), relu] (64 -> 32 -> 16 -> 8),
    flatten, dense(10)."""
    layers = []
    for _ in range(3):
        layers += [jp.conv1d(CNN_CH, CNN_K, stride=2), jp.relu()]
    return jp.serial(*layers, jp.flatten(), jp.dense(N_CLASSES))


def cnn_flops(batch):
    """GEMM-equivalent flops: 2 B L_out K C_in C_out per conv for forward, dW and dx
    (no dx for the first layer), and the same for the final dense layer."""
    total, length, c_in = 0, CNN_LEN, 1
    for i in range(3):
        length //= 2
        f = 2 * batch * length * CNN_K * c_in * CNN_CH
        total += f * (3 if i else 2)
        c_in = CNN_CH
    return total + 3 * 2 * batch * length * CNN_CH * N_CLASSES


# ----------------------------------------------------------------------------- jax steps

def make_step(gradient_fn, tx):
    """One jitted training step; params and optimizer state are donated."""
    def step(params, opt_state, x, y):
        value, grads = gradient_fn(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value
    return jax.jit(step, donate_argnums=(0, 1))


def gradient_fns(net, loss):
    """(hand, autodiff): the same call shape, the same forward."""
    def cost(params, x, y):
        pred, _ = jp.call_forward(net, params, x)
        return loss.forward(pred, y)[0]
    return jp.value_and_grad(net, loss), jax.value_and_grad(cost)


def compile_stats(step, args):
    """(compiled, compile seconds, footprint bytes, XLA flops, XLA peak bytes).

    Footprint: arguments + outputs - aliased (donated) + temporaries, from
    XLA's compiled memory analysis. XLA allocates the temporaries as one
    block, so this is the memory the step holds while it runs. XLA's own
    ``peak_memory_in_bytes`` is reported too (on CPU it leaves out most of
    the temporaries, so it is not the figure compared).
    """
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = xla_peak = 0
    if mem is not None:
        peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                + mem.temp_size_in_bytes)
        xla_peak = getattr(mem, "peak_memory_in_bytes", 0)
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", float("nan")))
    except Exception:                       # some backends have no cost analysis
        flops = float("nan")
    return compiled, seconds, int(peak), flops, int(xla_peak)


class JaxContestant:
    """A compiled step with its own donated state, run k steps at a time."""

    def __init__(self, compiled, params, opt_state, x, y):
        self.compiled, self.x, self.y = compiled, x, y
        self.params, self.opt_state = params, opt_state

    def run(self, k):
        p, s, v = self.params, self.opt_state, None
        for _ in range(k):
            p, s, v = self.compiled(p, s, self.x, self.y)
        v.block_until_ready()
        self.params, self.opt_state = p, s
        return v


class GemmContestant:
    def __init__(self, m, k, n, dtype=jnp.float32):
        ka, kb = jax.random.split(jax.random.key(0))
        self.a = jax.random.normal(ka, (m, k), dtype)
        self.b = jax.random.normal(kb, (k, n), dtype)
        self.f = jax.jit(jnp.dot)
        self.flops = 2 * m * k * n
        self.f(self.a, self.b).block_until_ready()

    def run(self, k):
        out = None
        for _ in range(k):
            out = self.f(self.a, self.b)
        out.block_until_ready()


# ----------------------------------------------------------------------------- torch

def torch_available():
    try:
        import torch  # noqa: F401
        return True
    except Exception:
        return False


class TorchGemmContestant:
    """torch.mm of the given shape (float32): PyTorch's GEMM library against XLA's."""

    def __init__(self, m, k, n):
        import torch
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(m, k, generator=g)
        self.b = torch.randn(k, n, generator=g)
        self.flops = 2 * m * k * n
        torch.mm(self.a, self.b)

    def run(self, k):
        import torch
        for _ in range(k):
            torch.mm(self.a, self.b)


class TorchContestant:
    """The same network and SGD step in PyTorch eager (float32, CPU)."""

    def __init__(self, kind, batch, width, depth, seed=0):
        import torch
        torch.manual_seed(seed)
        nn = torch.nn
        if kind == "cnn":
            layers, c_in = [], 1
            for _ in range(3):
                # same output lengths as SAME padding (JAX pads (1, 2), PyTorch (2, 2)): same flops
                layers += [nn.Conv1d(c_in, CNN_CH, CNN_K, stride=2, padding=2), nn.ReLU()]
                c_in = CNN_CH
            self.model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(CNN_CH * (CNN_LEN // 8), N_CLASSES))
            self.x = torch.randn(batch, 1, CNN_LEN)
        else:
            layers = []
            for _ in range(depth):
                layers += [nn.Linear(width, width), nn.ReLU()]
            self.model = nn.Sequential(*layers, nn.Linear(width, N_CLASSES))
            self.x = torch.randn(batch, width)
        self.y = torch.randint(0, N_CLASSES, (batch,))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.loss = nn.functional.cross_entropy

    def run(self, k):
        for _ in range(k):
            self.opt.zero_grad(set_to_none=True)
            value = self.loss(self.model(self.x), self.y)
            value.backward()
            self.opt.step()
        return float(value.detach())


# ----------------------------------------------------------------------------- timing

def calibrate(contestant, min_block_s, max_k=10_000):
    """Steps per block so that one block lasts about min_block_s."""
    contestant.run(1)
    t0 = time.perf_counter()
    contestant.run(1)
    t = max(time.perf_counter() - t0, 1e-6)
    return int(min(max_k, max(1, math.ceil(min_block_s / t))))


def interleaved(contestants: dict, k, pairs: int, pair=("hand", "ad")) -> dict:
    """Seconds per step for each contestant, one block each per round.

    The two compared steps (``pair``) run back to back at the end of every
    round, in alternating order, so each of them follows the other contestants
    (which can leave the caches cold, e.g. a large GEMM) equally often; the
    other contestants rotate among themselves. ``k``: steps per block, an int
    or a dict per contestant.
    """
    names = list(contestants)
    head = [n for n in names if n not in pair]
    tail = [n for n in names if n in pair]
    times = {n: [] for n in names}
    for r in range(pairs):
        order = head[r % len(head):] + head[:r % len(head)] if head else []
        order += tail if r % 2 == 0 else tail[::-1]
        for n in order:
            kn = k[n] if isinstance(k, dict) else k
            t0 = time.perf_counter()
            contestants[n].run(kn)
            times[n].append((time.perf_counter() - t0) / kn)
    return times


def alternating_pairs(run, names=("hand", "autodiff"), *, pairs: int, warmup: int):
    """Time two steps one call at a time: ``run(name)`` returns the seconds of one
    step of ``name``. After ``warmup`` calls of each, ``pairs`` pairs, alternating
    which goes first (a drift in machine load hits both alike). Returns
    ``({name: [seconds]}, [ratio names[0] / names[1], one per pair])``."""
    a, b = names
    for _ in range(warmup):
        run(a), run(b)
    times, ratios = {a: [], b: []}, []
    for i in range(pairs):
        t = {n: run(n) for n in ((a, b) if i % 2 == 0 else (b, a))}
        for n in t:
            times[n].append(t[n])
        ratios.append(t[a] / t[b])
    return times, ratios


def ratio_stats(a, b):
    """Per-pair ratios a_i / b_i: median, quartiles, min, max."""
    r = np.asarray(a) / np.asarray(b)
    q25, med, q75 = np.percentile(r, [25, 50, 75])
    return {"med": float(med), "q25": float(q25), "q75": float(q75), "min": float(r.min()), "max": float(r.max())}


def gemm_peak(sizes, pairs, min_block_s):
    """Best median GFLOP/s of square float32 jnp.dot over ``sizes``."""
    best = 0.0
    per = {}
    for n in sizes:
        g = GemmContestant(n, n, n)
        k = calibrate(g, min_block_s)
        t = statistics.median(interleaved({"g": g}, k, pairs)["g"])
        per[n] = g.flops / t / 1e9
        best = max(best, per[n])
    return best, per


# ----------------------------------------------------------------------------- one size

def bench_size(kind, batch, width, depth, *, pairs, min_block_s, use_torch, use_repeat=False,
               gemm_ref=True, mixed=False, peak_n=None, seed=0):
    loss = jp.softmax_cross_entropy()
    if kind == "cnn":
        net, in_shape, flops = cnn(), (batch, CNN_LEN, 1), cnn_flops(batch)
    else:
        net, in_shape = mlp(width, depth, use_repeat=use_repeat), (batch, width)
        flops = mlp_flops(batch, width, depth)
    k_init, k_x, k_y = jax.random.split(jax.random.key(seed), 3)
    params = jax.jit(lambda k: net.init(k, in_shape)[1])(k_init)
    params = jp.cast_floating(params, jnp.float32)
    x = jax.random.normal(k_x, in_shape, jnp.float32)
    y = jax.random.randint(k_y, (batch,), 0, N_CLASSES)
    tx = optax.sgd(LR)
    hand_fn, ad_fn = gradient_fns(net, loss)

    row = {"kind": kind if not use_repeat else kind + "-repeat", "batch": batch, "width": width,
           "depth": depth, "gflop_per_step": flops / 1e9}
    contestants = {}
    for name, fn in (("hand", hand_fn), ("ad", ad_fn)):
        p = jax.tree_util.tree_map(jnp.copy, params)
        s = tx.init(p)
        compiled, secs, peak, xla_flops, xla_peak = compile_stats(make_step(fn, tx), (p, s, x, y))
        row[f"compile_{name}_s"] = secs
        row[f"mem_{name}_mb"] = peak / 2 ** 20
        row[f"mem_{name}_bytes"] = int(peak)
        row[f"xla_peak_{name}_mb"] = xla_peak / 2 ** 20
        row[f"xla_gflop_{name}"] = xla_flops / 1e9
        contestants[name] = JaxContestant(compiled, p, s, x, y)
    # same loss value before timing: the two steps compute the same thing
    v_hand = float(contestants["hand"].run(1))
    v_ad = float(contestants["ad"].run(1))
    row["loss_rel_diff"] = abs(v_hand - v_ad) / max(abs(v_ad), 1e-30)
    if mixed:                                     # bfloat16 compute, float32 master weights
        p = jax.tree_util.tree_map(jnp.copy, params)
        st = tx.init(p)
        vg16 = jp.mixed_value_and_grad(net, loss, compute_dtype=jnp.bfloat16)
        compiled, secs, peak, _, _ = compile_stats(make_step(vg16, tx), (p, st, x, y))
        row["mem_bf16_mb"] = peak / 2 ** 20
        contestants["bf16"] = JaxContestant(compiled, p, st, x, y)
    if use_torch:
        contestants["torch"] = TorchContestant(kind, batch, width, depth, seed)
    if gemm_ref and kind == "mlp":
        contestants["gemm"] = GemmContestant(batch, width, width)
        if use_torch:                             # the same GEMM in PyTorch: which library is faster
            contestants["torch_gemm"] = TorchGemmContestant(batch, width, width)
    if peak_n:                                    # the GEMM peak, timed in the same rounds
        contestants["peak"] = GemmContestant(peak_n, peak_n, peak_n)
    ks = {n: calibrate(c, min_block_s) for n, c in contestants.items()}
    ks["ad"] = ks["hand"]                         # the compared steps run equal blocks
    k = ks["hand"]
    times = interleaved(contestants, ks, pairs)

    med = {n: statistics.median(t) for n, t in times.items()}
    row.update(steps_per_block=k, pairs=pairs, hand_ms=med["hand"] * 1e3, ad_ms=med["ad"] * 1e3)
    for key, v in ratio_stats(times["hand"], times["ad"]).items():
        row[f"hand_over_ad_{key}"] = v
    row["hand_gflops"] = flops / med["hand"] / 1e9
    row["ad_gflops"] = flops / med["ad"] / 1e9
    if "torch" in times:
        row["torch_ms"] = med["torch"] * 1e3
        for key, v in ratio_stats(times["hand"], times["torch"]).items():
            row[f"hand_over_torch_{key}"] = v
    if "bf16" in times:
        row["bf16_ms"] = med["bf16"] * 1e3
        for key, v in ratio_stats(times["bf16"], times["hand"]).items():
            row[f"bf16_over_hand_{key}"] = v
    if "gemm" in times:
        row["gemm_shape_gflops"] = contestants["gemm"].flops / med["gemm"] / 1e9
        row["hand_frac_gemm_shape"] = row["hand_gflops"] / row["gemm_shape_gflops"]
    if "torch_gemm" in times:
        row["torch_gemm_shape_gflops"] = contestants["torch_gemm"].flops / med["torch_gemm"] / 1e9
        row["xla_gemm_over_torch_gemm_med"] = ratio_stats(times["gemm"], times["torch_gemm"])["med"]
    if "peak" in times:
        row["peak_gflops"] = contestants["peak"].flops / med["peak"] / 1e9
        row["hand_frac_peak"] = row["hand_gflops"] / row["peak_gflops"]
    row["compile_hand_over_ad"] = row["compile_hand_s"] / row["compile_ad_s"]
    row["mem_hand_over_ad"] = row["mem_hand_mb"] / row["mem_ad_mb"] if row["mem_ad_mb"] else float("nan")
    return row


# ----------------------------------------------------------------------------- compile study

def compile_study(batch, width, depths, repeats=3):
    """Compile time (median of ``repeats`` fresh compiles) of the hand step for
    serial and repeat of (dense+relu) x n, plus jax.grad of the repeat net."""
    rows = []
    loss, tx = jp.softmax_cross_entropy(), optax.sgd(LR)
    for n in depths:
        for variant in ("serial", "repeat", "repeat-ad"):
            if variant == "serial" and n > 16 and repeats > 1:
                reps = 1                           # the unrolled program is slow to compile
            else:
                reps = repeats
            net = mlp(width, n, use_repeat=variant != "serial")
            params = jax.eval_shape(lambda k: net.init(k, (batch, width))[1], jax.random.key(0))
            s = jax.eval_shape(tx.init, params)
            x = jax.ShapeDtypeStruct((batch, width), jnp.float32)
            y = jax.ShapeDtypeStruct((batch,), jnp.int32)
            secs, peak = [], 0
            for _ in range(reps):
                hand_fn, ad_fn = gradient_fns(net, loss)       # fresh closures: no compile cache
                step = make_step(ad_fn if variant == "repeat-ad" else hand_fn, tx)
                _, t, peak, _, _ = compile_stats(step, (params, s, x, y))
                secs.append(t)
            rows.append({"variant": variant, "depth": n, "batch": batch, "width": width,
                         "compile_s": statistics.median(secs), "compiles": reps, "mem_mb": peak / 2 ** 20})
    return rows


# ----------------------------------------------------------------------------- report

COLUMNS = ["kind", "batch", "width", "depth", "gflop_per_step", "hand_ms", "ad_ms", "torch_ms",
           "hand_over_ad_med", "hand_over_ad_q25", "hand_over_ad_q75", "hand_over_ad_min", "hand_over_ad_max",
           "hand_over_torch_med", "hand_over_torch_q25", "hand_over_torch_q75", "hand_over_torch_min",
           "hand_over_torch_max", "hand_gflops", "ad_gflops", "peak_gflops", "hand_frac_peak",
           "gemm_shape_gflops", "hand_frac_gemm_shape", "torch_gemm_shape_gflops", "xla_gemm_over_torch_gemm_med",
           "compile_hand_s", "compile_ad_s", "compile_hand_over_ad",
           "mem_hand_mb", "mem_ad_mb", "mem_hand_over_ad", "mem_hand_bytes", "mem_ad_bytes", "xla_peak_hand_mb", "xla_peak_ad_mb", "xla_gflop_hand", "xla_gflop_ad", "loss_rel_diff",
           "steps_per_block", "pairs", "bf16_ms", "bf16_over_hand_med", "bf16_over_hand_q25",
           "bf16_over_hand_q75", "mem_bf16_mb"]


def fmt(v, nd=3):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def table(rows):
    head = ["size (kind B W D)", "hand ms", "hand/jax.grad med [q25, q75] (min-max)", "hand/torch med [q25, q75]", "GEMM@shape XLA/torch",
            "hand GFLOP/s", "peak GFLOP/s", "% peak", "% GEMM@shape", "compile hand/ad", "mem MB hand/ad", "bf16/f32 hand med"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        size = f"{r['kind']} {r['batch']} {r['width']} {r['depth']}"
        ad = (f"{fmt(r['hand_over_ad_med'])} [{fmt(r['hand_over_ad_q25'])}, {fmt(r['hand_over_ad_q75'])}] "
              f"({fmt(r['hand_over_ad_min'])}-{fmt(r['hand_over_ad_max'])})")
        th = ("-" if "hand_over_torch_med" not in r else
              f"{fmt(r['hand_over_torch_med'])} [{fmt(r['hand_over_torch_q25'])}, {fmt(r['hand_over_torch_q75'])}]")
        lines.append("| " + " | ".join([
            size, fmt(r["hand_ms"], 2), ad, th, fmt(r.get("xla_gemm_over_torch_gemm_med")), fmt(r["hand_gflops"], 1), fmt(r.get("peak_gflops"), 1),
            fmt(100 * r.get("hand_frac_peak", float("nan")), 1),
            fmt(100 * r.get("hand_frac_gemm_shape", float("nan")), 1),
            f"{fmt(r['compile_hand_s'], 2)}/{fmt(r['compile_ad_s'], 2)} s",
            f"{fmt(r['mem_hand_mb'], 2)}/{fmt(r['mem_ad_mb'], 2)}",
            fmt(r.get("bf16_over_hand_med"))]) + " |")
    return "\n".join(lines)


def targets(rows, study):
    """One line per target of the issue: the worst figure and met / not met."""
    out = []
    med = [(r["hand_over_ad_med"], r) for r in rows]
    worst = max(med, key=lambda t: t[0])
    out.append(f"- hand / jax.grad step time <= 1.00 (median paired ratio) at every size: worst "
               f"{worst[0]:.3f} at {worst[1]['kind']} B={worst[1]['batch']} W={worst[1]['width']} "
               f"D={worst[1]['depth']}; {sum(m <= 1.0 for m, _ in med)}/{len(med)} sizes <= 1.00 -> "
               f"{'met' if worst[0] <= 1.0 else 'NOT met'}")
    slower = [r for _, r in med if r["hand_over_ad_q25"] > 1.0]
    faster = [r for _, r in med if r["hand_over_ad_q75"] < 1.0]
    out.append(f"  - of those, clearly slower (the whole interquartile range above 1.00): {len(slower)}"
               + (" (" + ", ".join(f"B={r['batch']} W={r['width']} D={r['depth']} {r['hand_over_ad_med']:.3f}"
                                   for r in slower) + ")" if slower else "")
               + f"; clearly faster (range below 1.00): {len(faster)}; the rest are ties within the spread")
    big = [r for r in rows if r["kind"] == "mlp" and r["batch"] == 1024 and r["width"] >= 1024]
    if big:
        lo = min(big, key=lambda r: r["hand_frac_peak"])
        out.append(f"- step at B=1024, W>=1024 reaches >= 85% of the GEMM peak: lowest "
                   f"{100 * lo['hand_frac_peak']:.1f}% (W={lo['width']} D={lo['depth']}; "
                   f"{lo['hand_gflops']:.1f} of {lo['peak_gflops']:.1f} GFLOP/s); range "
                   + ", ".join(f"{100 * r['hand_frac_peak']:.1f}%" for r in big)
                   + f" -> {'met' if lo['hand_frac_peak'] >= 0.85 else 'NOT met'}")
    tr = [(r["hand_over_torch_med"], r) for r in rows if "hand_over_torch_med" in r]
    if tr:
        w = max(tr, key=lambda t: t[0])
        out.append(f"- hand / PyTorch eager <= 1.00 at every size: worst {w[0]:.3f} at {w[1]['kind']} "
                   f"B={w[1]['batch']} W={w[1]['width']} D={w[1]['depth']}; {sum(m <= 1.0 for m, _ in tr)}/"
                   f"{len(tr)} sizes <= 1.00 -> {'met' if w[0] <= 1.0 else 'NOT met'}"
                   + (f" (there XLA's GEMM of the step's shape takes {w[1]['xla_gemm_over_torch_gemm_med']:.3f}x "
                      "PyTorch's time)" if "xla_gemm_over_torch_gemm_med" in w[1] else ""))
    else:
        out.append("- hand / PyTorch eager: not measured (--no-torch, or PyTorch not installed)")
    if study:
        by = {(s["variant"], s["depth"]): s for s in study}
        depths = sorted({s["depth"] for s in study})
        lo_d, hi_d = depths[0], depths[-1]
        if ("repeat", hi_d) in by and ("serial", lo_d) in by:
            r = by[("repeat", hi_d)]["compile_s"] / by[("serial", lo_d)]["compile_s"]
            r2 = by[("repeat", hi_d)]["compile_s"] / by[("repeat", lo_d)]["compile_s"]
            out.append(f"- compile time of repeat(dense+relu, {hi_d}) <= 1.5x that of depth {lo_d}: "
                       f"{r:.2f}x serial depth {lo_d} -> {'met' if r <= 1.5 else 'NOT met'}; "
                       f"{r2:.2f}x repeat depth {lo_d} (flat in depth) -> {'met' if r2 <= 1.5 else 'NOT met'}")
    mem = [(r["mem_hand_over_ad"], r) for r in rows]
    w = max(mem, key=lambda t: t[0])
    diffs = [r["mem_hand_bytes"] - r["mem_ad_bytes"] for r in rows]
    larger = sorted({d for d in diffs if d > 0})
    out.append(f"- peak memory of the hand step <= jax.grad's at every size: worst ratio {w[0]:.6f} at "
               f"{w[1]['kind']} B={w[1]['batch']} W={w[1]['width']} D={w[1]['depth']}; equal to the byte at "
               f"{diffs.count(0)}/{len(rows)} sizes, smaller at {sum(d < 0 for d in diffs)}, larger at "
               f"{sum(d > 0 for d in diffs)}" + (f" (by {', '.join(f'{d} B' for d in larger)})" if larger else "")
               + f" -> {'met' if w[0] <= 1.0 else 'NOT met'}")
    return out


def usable_cores():
    """Cores this process may run on (``taskset`` restricts them), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def environment(use_torch):
    dev = jax.devices()[0]
    lines = [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
             f"- jax {jax.__version__}, backend {jax.default_backend()}, device {dev.device_kind}, "
             f"{os.cpu_count()} CPU cores ({usable_cores()} usable by this process), "
             f"Python {platform.python_version()}, {platform.machine()}"]
    if use_torch:
        import torch
        lines.append(f"- PyTorch {torch.__version__}, {torch.get_num_threads()} threads, "
                     f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    if hasattr(os, "getloadavg"):
        lines.append("- load average at start (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    return lines


def write(out, prefix, rows, study, peak, peak_per, env, args, elapsed):
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, prefix + ".csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({c: (f"{r[c]:.6g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in COLUMNS})
    if study:
        with open(os.path.join(out, prefix + "_compile.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(study[0]))
            w.writeheader()
            w.writerows(study)
    md = [f"# Training-step benchmark ({prefix})", "",
          "Reproduce: `python -m experiments.bench.benchmark " + " ".join(args) + "`", ""]
    md += env
    if hasattr(os, "getloadavg"):
        md.append("- load average at end (1, 5, 15 min): " + ", ".join(f"{v:.2f}" for v in os.getloadavg()))
    md += [f"- wall time of the run: {elapsed:.0f} s",
           "- the machine was shared with other developers' jobs during the run: absolute times are noisy; "
           "each ratio is a median over rounds of back-to-back blocks (PyTorch and the GEMMs rotating, then "
           "hand and jax.grad adjacent in alternating order), which cancels most of the drift",
           f"- GEMM peak at the start (square float32 jnp.dot, median GFLOP/s, best of sizes): {peak:.1f} GFLOP/s ("
           + ", ".join(f"n={n}: {g:.1f}" for n, g in peak_per.items()) + "); the `% peak` of each size is "
           f"against an n={max(peak_per)} GEMM timed in the same rounds as that size's steps",
           "", "## Targets", ""]
    md += targets(rows, study)
    md += ["", "## Steps", "", "Ratios < 1: the hand-written step is faster. `% peak`: step GFLOP/s (GEMM flops, "
           "analytic) over the GFLOP/s of a square GEMM (`peak`) timed in the same interleaved rounds; "
           "`% GEMM@shape`: over a (B, W) @ (W, W) GEMM timed the same way; `GEMM@shape XLA/torch`: "
           "median paired time ratio of that GEMM in XLA (`jnp.dot`) and in PyTorch (`torch.mm`), timed in the same rounds. Memory: arguments + outputs - donated (aliased) + temporaries, from XLA's compiled memory analysis.", "",
           table(rows)]
    if study:
        md += ["", "## Compile time: repeat (lax.scan) vs serial (unrolled), hand-written step", "",
               "| variant | depth | compile s | compiles | peak MB |", "|---|---|---|---|---|"]
        md += [f"| {s['variant']} | {s['depth']} | {s['compile_s']:.2f} | {s['compiles']} | {s['mem_mb']:.2f} |"
               for s in study]
    md_path = os.path.join(out, prefix + ".md")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")
    return csv_path, md_path


# ----------------------------------------------------------------------------- main

def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a small sweep that finishes in under a minute")
    ap.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--width", type=int, nargs="+", default=[64, 256, 1024, 2048])
    ap.add_argument("--depth", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--pairs", type=int, default=None,
                    help="interleaved rounds per size (default 16, halved for steps over 20 GFLOP; quick 4)")
    ap.add_argument("--min-block-s", type=float, default=None, help="seconds per timed block (default 0.2)")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--no-cnn", action="store_true")
    ap.add_argument("--no-compile-study", action="store_true")
    ap.add_argument("--repeat-rows", action="store_true", help="also time the MLP built with jp.repeat")
    ap.add_argument("--mixed", action="store_true",
                    help="also time the hand step in bfloat16 compute with float32 master weights")
    ap.add_argument("--compile-study-width", type=int, default=None)
    ap.add_argument("--budget-s", type=float, default=None, help="start no new size after this many seconds")
    ap.add_argument("--prefix", default=None, help="output file prefix (default benchmark, benchmark_quick)")
    ap.add_argument("--out", default=RESULTS, help="output folder (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.quick:
        args.batch, args.width, args.depth = [128, 1024], [64, 256], [2]
    args.pairs = args.pairs or (4 if args.quick else 16)
    args.min_block_s = args.min_block_s or (0.03 if args.quick else 0.2)
    args.prefix = args.prefix or ("benchmark_quick" if args.quick else "benchmark")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    t_start = time.perf_counter()
    use_torch = not args.no_torch and torch_available() and jax.default_backend() == "cpu"
    env = environment(use_torch)
    print("\n".join(env), flush=True)

    peak_sizes = [1024] if args.quick else [1024, 2048]
    if jax.default_backend() != "cpu":
        peak_sizes = [2048, 4096, 8192]           # an accelerator reaches its peak on larger GEMMs
    peak, peak_per = gemm_peak(peak_sizes, 3 if args.quick else 5, args.min_block_s)
    print(f"GEMM peak: {peak:.1f} GFLOP/s {peak_per}", flush=True)

    sizes = [("mlp", b, w, d, False) for b in args.batch for w in args.width for d in args.depth]
    if args.repeat_rows:
        sizes += [("mlp", b, w, d, True) for b in args.batch for w in args.width for d in args.depth]
    if not args.no_cnn and hasattr(jp, "conv1d") and hasattr(jp, "max_pool"):
        sizes += [("cnn", b, CNN_CH, 3, False) for b in args.batch]
    rows = []
    for kind, b, w, d, rep in sizes:
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"budget of {args.budget_s:.0f} s spent: skipping the remaining sizes", flush=True)
            break
        pairs = args.pairs if (kind == "cnn" or mlp_flops(b, w, d) < 2e10) else max(4, args.pairs // 2)
        try:
            r = bench_size(kind, b, w, d, pairs=pairs, min_block_s=args.min_block_s,
                           use_torch=use_torch, use_repeat=rep, mixed=args.mixed, peak_n=peak_sizes[-1])
        except Exception as e:                   # a layer from another issue may not be ready
            if kind != "cnn":
                raise
            print(f"cnn row skipped: {type(e).__name__}: {e}", flush=True)
            continue
        r.setdefault("peak_gflops", peak)
        r.setdefault("hand_frac_peak", r["hand_gflops"] / peak)
        rows.append(r)
        print(f"{r['kind']:10s} B={b:5d} W={w:5d} D={d}  hand {r['hand_ms']:9.3f} ms  ad {r['ad_ms']:9.3f} ms  "
              f"hand/ad {r['hand_over_ad_med']:.3f} [{r['hand_over_ad_q25']:.3f}, {r['hand_over_ad_q75']:.3f}]  "
              + (f"hand/torch {r['hand_over_torch_med']:.3f}  " if "hand_over_torch_med" in r else "")
              + f"{r['hand_gflops']:7.1f} GFLOP/s ({100 * r['hand_frac_peak']:.0f}% peak)  "
              f"compile {r['compile_hand_s']:.2f}/{r['compile_ad_s']:.2f} s  "
              f"mem {r['mem_hand_mb']:.2f}/{r['mem_ad_mb']:.2f} MB"
              + (f"  bf16/f32 {r['bf16_over_hand_med']:.3f}" if "bf16_over_hand_med" in r else ""), flush=True)

    study = []
    if not args.no_compile_study:
        depths = [4, 64]
        study = compile_study(128, args.compile_study_width or (64 if args.quick else 256), depths,
                              repeats=1 if args.quick else 3)
        for s in study:
            print(f"compile {s['variant']:9s} depth {s['depth']:3d}: {s['compile_s']:.2f} s", flush=True)
    end_peak, _ = gemm_peak(peak_sizes[-1:], 3, args.min_block_s)
    env.append(f"- GEMM peak re-measured at the end: {end_peak:.1f} GFLOP/s")
    csv_path, md_path = write(args.out, args.prefix, rows, study, peak, peak_per, env, argv,
                              time.perf_counter() - t_start)
    print()
    print(table(rows))
    print()
    print("\n".join(targets(rows, study)))
    print(f"\nwrote {csv_path} and {md_path}")
    return rows, study


if __name__ == "__main__":
    main()

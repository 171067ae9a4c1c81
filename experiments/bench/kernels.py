"""XLA's CPU kernels against PyTorch's, one operation at a time, at the benchmark's shapes.

The training-step benchmark compares whole steps. Where the hand-written step
is slower than PyTorch's, this script asks whether the difference is in the
gradient code or in the kernel libraries underneath: it times the same single
operation in XLA (``jax.jit``) and in PyTorch (eager), interleaved, float32:

* the GEMMs of a dense layer at batch B, width W: forward ``x @ w`` (B, W) @ (W, W),
  and the weight gradient ``x^T @ dy`` (contracting the batch axis);
* the convolutions of the benchmark CNN's middle layer (conv1d, 32 -> 32 channels,
  kernel 5, stride 2, length 32, batch 1024): forward, kernel gradient and input
  gradient (XLA: the ``lax.conv_general_dilated`` calls that ``jp.conv1d`` makes;
  PyTorch: ``conv1d``, ``torch.nn.grad.conv1d_weight`` / ``conv1d_input``).

For each it reports XLA's and PyTorch's median time and the median paired
ratio XLA / PyTorch (> 1: XLA is slower). Writes ``experiments/bench/results/kernels.md``.

    python -m experiments.bench.kernels    # about a minute
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see benchmark.py: fair interleaving with torch

import jax
import jax.numpy as jnp
import numpy as np

import jaxprop as jp
from experiments.bench import benchmark as bm

def timed(fn, rounds_k):
    t0 = time.perf_counter()
    for _ in range(rounds_k):
        fn()
    return (time.perf_counter() - t0) / rounds_k


def pair(xla_fn, torch_fn, rounds, min_block_s):
    """Median seconds of each and the median per-round ratio XLA / PyTorch."""
    xla_fn(), torch_fn()
    t = max(timed(xla_fn, 1), 1e-6)
    k = max(1, int(min_block_s / t))
    tx, tt = [], []
    for r in range(rounds):
        order = [(xla_fn, tx), (torch_fn, tt)]
        for fn, acc in (order if r % 2 == 0 else order[::-1]):
            acc.append(timed(fn, k))
    return statistics.median(tx), statistics.median(tt), bm.ratio_stats(tx, tt)


def gemm_cases(batch, width):
    import torch
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (batch, width), jnp.float32)
    w = jax.random.normal(kw, (width, width), jnp.float32)
    dy = jax.random.normal(kd, (batch, width), jnp.float32)
    fwd = jax.jit(lambda x, w: x @ w)
    dw = jax.jit(lambda x, dy: x.T @ dy)
    tx_, tw_, td_ = (torch.from_numpy(np.array(a)) for a in (x, w, dy))
    flops = 2 * batch * width * width
    yield (f"GEMM forward x @ w, B={batch} W={width}", flops,
           lambda: fwd(x, w).block_until_ready(), lambda: torch.mm(tx_, tw_))
    yield (f"GEMM weight gradient x^T @ dy, B={batch} W={width}", flops,
           lambda: dw(x, dy).block_until_ready(), lambda: torch.mm(tx_.t(), td_))


def conv_cases(batch=1024, length=32, channels=32, kernel=5, stride=2):
    """The benchmark CNN's middle layer, through jp.conv1d's own forward and backward."""
    import torch
    layer = jp.conv1d(channels, kernel, stride=stride, bias=False)
    kx, kw, kd = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(kx, (batch, length, channels), jnp.float32)
    _, params = layer.init(kw, x.shape)
    params = jp.cast_floating(params, jnp.float32)
    y, cache = jax.jit(layer.forward)(params, x)
    dy = jax.random.normal(kd, y.shape, jnp.float32)
    fwd = jax.jit(lambda p, x: layer.forward(p, x)[0])
    grad_w = jax.jit(lambda c, dy: layer.backward(c, dy)[0])
    grad_x = jax.jit(lambda c, dy: layer.backward(c, dy)[1])
    out_len = y.shape[1]
    tx_ = torch.from_numpy(np.array(x)).permute(0, 2, 1).contiguous()          # (N, C, L)
    tw_ = torch.from_numpy(np.array(params["w"])).permute(2, 1, 0).contiguous()  # (F, C, K)
    td_ = torch.from_numpy(np.array(dy)).permute(0, 2, 1).contiguous()         # (N, F, O)
    tconv = torch.nn.functional.conv1d
    # PyTorch pads (2, 2), jp's SAME (1, 2): the same output length and flops
    assert tconv(tx_, tw_, stride=stride, padding=2).shape[-1] == out_len
    flops = 2 * batch * out_len * kernel * channels * channels
    name = f"conv1d {channels}->{channels}, k={kernel}, s={stride}, L={length}, N={batch}"
    yield (f"{name}: forward", flops, lambda: fwd(params, x).block_until_ready(),
           lambda: tconv(tx_, tw_, stride=stride, padding=2))
    yield (f"{name}: kernel gradient", flops, lambda: grad_w(cache, dy)["w"].block_until_ready(),
           lambda: torch.nn.grad.conv1d_weight(tx_, tw_.shape, td_, stride=stride, padding=2))
    yield (f"{name}: input gradient", flops, lambda: grad_x(cache, dy).block_until_ready(),
           lambda: torch.nn.grad.conv1d_input(tx_.shape, tw_, td_, stride=stride, padding=2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--min-block-s", type=float, default=0.1)
    ap.add_argument("--sizes", type=int, nargs=2, action="append", metavar=("B", "W"),
                    help="GEMM batch and width (repeatable; default: 1024 1024, 1024 2048, 128 2048)")
    ap.add_argument("--out", default=os.path.join(bm.RESULTS, "kernels.md"))
    args = ap.parse_args(argv)
    if not bm.torch_available():
        sys.exit("kernels.py compares against PyTorch: pip install -e '.[bench]'")
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
    lines = ["# XLA's CPU kernels against PyTorch's, one operation at a time", "",
             "Reproduce: `python -m experiments.bench.kernels`", ""]
    lines += bm.environment(True)
    lines += ["", "| operation | XLA ms | PyTorch ms | XLA GFLOP/s | PyTorch GFLOP/s | XLA / PyTorch med [q25, q75] |",
              "|---|---|---|---|---|---|"]
    cases = []
    for b, w in args.sizes or [(1024, 1024), (1024, 2048), (128, 2048)]:
        cases += list(gemm_cases(b, w))
    cases += list(conv_cases())
    for name, flops, xla_fn, torch_fn in cases:
        tx, tt, r = pair(xla_fn, torch_fn, args.rounds, args.min_block_s)
        lines.append(f"| {name} | {tx * 1e3:.3f} | {tt * 1e3:.3f} | {flops / tx / 1e9:.1f} | {flops / tt / 1e9:.1f} | "
                     f"{r['med']:.3f} [{r['q25']:.3f}, {r['q75']:.3f}] |")
        print(lines[-1], flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()

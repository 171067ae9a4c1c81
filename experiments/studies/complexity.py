"""Every influence path versus backprop's dynamic programme, counted and timed.

    python -m experiments.studies.complexity            # default sweep, a few minutes of CPU
    python -m experiments.studies.complexity --quick    # < 30 s
    python -m experiments.studies.complexity --out DIR  # elsewhere than experiments/studies/results/complexity

For MLPs ``(w, w, ..., w, 1)`` of depth L = 1..12 (w^L input-to-output paths)
and widths w = 2..8, and for realistic shapes such as 40-100-100-10, the
gradient of the MSE cost of one example is computed four ways:

  paths        every parameter's sum over its paths (jaxprop.studies.paths.path_gradient)
  fin. diff.   central differences, 2 forward passes per parameter
  fwd. mode    one JVP per parameter
  backprop     jp.value_and_grad, the reverse sweep

Each run records the counted operations (exact: scalar mul + add + other,
jaxprop.studies.complexity) and the wall time (median of repeats, after a warm-up
that compiles). A run whose predicted time (operations x the seconds per
operation measured so far for that method) exceeds --budget is not run: its
time is extrapolated and marked so. Writes complexity.csv, complexity.md,
summary.json, complexity_ops.png, complexity_time.png and
influence_paths.png, and states for each width the depth at which the path
method passes 1 s, 1 hour and 1 year on this machine.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import statistics
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import jaxprop as jp  # noqa: E402
from jaxprop.studies import complexity as cx  # noqa: E402
from jaxprop.studies import paths as px  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "complexity")
METHODS = ("paths", "finite_differences", "forward_mode", "backprop")
LABEL = {"paths": "paths (chain rule expanded)", "finite_differences": "finite differences",
         "forward_mode": "forward mode (JVP per param)", "backprop": "backprop (jp.value_and_grad)"}
COLOR = {"paths": "#d62728", "finite_differences": "#9467bd", "forward_mode": "#ff7f0e",
         "backprop": "#2ca02c"}
THRESHOLDS = (("1 s", 1.0), ("1 hour", 3600.0), ("1 year", 365.25 * 86400.0))
REALISTIC = ((40, 100, 100, 10), (64, 32, 32, 10), (40, 100, 100, 100, 10), (784, 128, 64, 10))


def net_for(widths):
    return cx.mlp(widths, "sigmoid", bias=True)


def data(model, seed=0):
    """Params in model.net's layout (LeCun-normal weights, small biases), one example.

    numpy draws them: jax.random would compile anew for every shape of the sweep."""
    rng = np.random.default_rng(seed)
    params = []
    for k in range(model.depth):
        fan_in, fan_out = model.widths[k], model.widths[k + 1]
        params.append({"w": jnp.asarray(rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)),
                       "b": jnp.asarray(0.1 * rng.standard_normal(fan_out))})
        if model.act(k) is not None:
            params.append(())
    x = jnp.asarray(rng.standard_normal((1, model.widths[0])))
    y = jnp.asarray(rng.uniform(0.1, 0.9, (1, model.widths[-1])))
    return tuple(params), x, y


def counted_ops(method, model):
    """The exact count (closed form, equal to the counted one: tests/test_complexity.py)."""
    return {"paths": px.path_ops, "finite_differences": cx.finite_difference_ops,
            "forward_mode": cx.forward_mode_ops, "backprop": cx.backprop_ops}[method](model, 1)


class Timer:
    """Times the methods; decides what runs; learns seconds per operation.

    The path method runs when its predicted time (operations x the seconds
    per operation of the largest run so far of the same width, or of any
    width) fits ``budget``. The polynomial methods run when their operation
    count is below ``max_ops``. What does not run is extrapolated with the
    rate of the largest measured run of that method (the least overhead-bound).
    """

    def __init__(self, budget, max_ops, repeats):
        self.budget, self.max_ops, self.repeats = budget, max_ops, repeats
        self.rate = {}               # (method, key) -> (ops, seconds per op) of its largest run

    def rate_for(self, method, key=None, *, guess=True):
        """Seconds per op from the largest run of (method, key), else of the method;
        runs under 10 ms are overhead, not rate: without one, a first guess (or None)."""
        for k in (key, None):
            ops, rate = self.rate.get((method, k), (0, 0.0))
            if ops * rate >= 0.01:
                return rate
        return ({"paths": 2e-8}.get(method, 2e-9)) if guess else None

    def learn(self, method, key, ops, t):
        for k in (key, None):
            if ops >= self.rate.get((method, k), (0, 0))[0]:
                self.rate[(method, k)] = (ops, t / ops)

    def run(self, method, model, params, x, y, ops, key):
        predicted = self.rate_for(method, key) * ops
        if (method == "paths" and predicted > self.budget) or (method != "paths" and ops > self.max_ops):
            return None, 0
        if method == "backprop":
            kernel = jax.jit(jp.value_and_grad(model.net, jp.mse()))
            fn = lambda: jax.block_until_ready(kernel(params, x, y))
            fn()
            reps = max(self.repeats, 15)
        else:
            f = {"paths": lambda: px.path_gradient(model, params, x, y, max_paths=math.inf),
                 "finite_differences": lambda: cx.finite_difference_gradient(model, params, x, y),
                 "forward_mode": lambda: cx.forward_mode_gradient(model, params, x, y)}[method]
            fn = lambda: jax.block_until_ready(f().grads)
            if method == "paths":       # compile and trace what is shared, not the paths
                px.local_derivatives(model, params, x, y)
                px.setup_ops(model, 1, "float64")
            else:
                fn()
            reps = self.repeats if predicted * self.repeats <= 2 * self.budget else 1
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        t = statistics.median(times)
        self.learn(method, key, ops, t)
        return t, reps


def run_config(timer, kind, widths, rows):
    model = net_for(widths)
    params, x, y = data(model)
    fwd = cx.forward_ops(model, 1).total
    key = widths[0] if kind == "depth" else "shape"
    line = []
    for method in METHODS:
        ops = counted_ops(method, model)
        t, reps = timer.run(method, model, params, x, y, ops.total, key)
        source = "measured"
        if t is None:
            rate = timer.rate_for(method, key if method == "paths" else None, guess=False)
            t, source = (rate * ops.total, "extrapolated") if rate else (math.nan, "not run")
        rows.append(dict(sweep=kind, widths="-".join(map(str, widths)), width=widths[0],
                         depth=model.depth, n_params=model.n_params, n_weights=model.n_weights,
                         io_paths=px.input_output_paths(widths), param_paths=px.total_paths(model),
                         method=method, ops=ops.total, mul=ops.mul, add=ops.add, other=ops.other,
                         forward_passes=ops.total / fwd, time_s=t, time_source=source, repeats=reps))
        mark = "*" if source == "extrapolated" else " "
        line.append(f"{method[:5]} {ops.total:9.3g} ops {fmt_time(t):>11}{mark}")
    name = "-".join(map(str, widths))
    if len(name) > 17:
        name = f"{widths[0]}-..x{model.depth}..-{widths[-1]}"
    print(f"{name:<18}" + " ".join(line), flush=True)
    return rows[-len(METHODS)]


CALIBRATION = (4,) * 9 + (1,)       # ~8e6 operations of the path method, tens of ms


def sweep(args):
    timer = Timer(args.budget, args.max_ops, args.repeats)
    rows = []
    t0 = time.perf_counter()
    # a first rate for the path method from one mid-sized run (small runs are overhead-bound)
    model = net_for(CALIBRATION)
    params, x, y = data(model)
    px.local_derivatives(model, params, x, y)
    px.setup_ops(model, 1, "float64")
    t = time.perf_counter()
    px.path_gradient(model, params, x, y, max_paths=math.inf)
    timer.learn("paths", "calibration", px.path_ops(model, 1).total, time.perf_counter() - t)
    for w in args.widths:       # increasing depth, so each width's rate is learned as it grows
        depth = 1
        while True:
            naive = run_config(timer, "depth", (w,) * depth + (1,), rows)
            past = depth >= args.max_depth
            # beyond max_depth, go on until the path method has been measured past 1 s
            if past and (not args.extend or naive["time_source"] != "measured" or naive["time_s"] >= 1.0
                         or depth >= 40):
                break
            depth += 1
    for s in args.shapes:
        run_config(timer, "shape", s, rows)
    print(f"(* extrapolated, not run)   sweep took {time.perf_counter() - t0:.0f} s")
    return rows, timer


def naive_rate(rows, width, timer):
    """Seconds per op of the path method for this width: its largest measured run
    (if it lasted 10 ms or more; else the largest run of the whole study)."""
    runs = [r for r in rows if r["sweep"] == "depth" and r["width"] == width and r["method"] == "paths"
            and r["time_source"] == "measured"]
    best = max(runs, key=lambda r: r["ops"]) if runs else None
    if best is None or best["time_s"] < 0.01:
        ops, rate = timer.rate[("paths", None)]
        return rate, "largest run"
    return best["time_s"] / best["ops"], f"L = {best['depth']}"


def thresholds(rows, widths, timer):
    out = []
    for w in widths:
        rate, basis = naive_rate(rows, w, timer)
        entry = dict(width=w, seconds_per_op=rate, rate_from=basis)
        measured = {r["depth"]: r["time_s"] for r in rows if r["sweep"] == "depth" and r["width"] == w
                    and r["method"] == "paths" and r["time_source"] == "measured"}
        for name, secs in THRESHOLDS:
            for depth in range(1, 400):
                m = net_for((w,) * depth + (1,))
                t = measured.get(depth, rate * px.path_ops(m, 1).total)
                if t >= secs:
                    entry[name] = dict(depth=depth, time_s=t, measured=depth in measured,
                                       paths_ops=px.path_ops(m, 1).total, backprop_ops=cx.backprop_ops(m, 1).total,
                                       io_paths=px.input_output_paths(m.widths))
                    break
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- outputs

def fmt_time(t):
    if math.isnan(t):
        return "not run"
    if t < 1e-3:
        return f"{t * 1e6:.3g} µs"
    if t < 1:
        return f"{t * 1e3:.3g} ms"
    if t < 3600:
        return f"{t:.3g} s"
    if t < 86400 * 365.25:
        return f"{t / 3600:.3g} h"
    return f"{t / (86400 * 365.25):.3g} years"


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def write_markdown(rows, th, args, path):
    by = {}
    for r in rows:
        by.setdefault((r["sweep"], r["widths"]), {})[r["method"]] = r
    L = []
    L.append("# Complexity study: results\n")
    L.append(f"Generated by `{args.command}`. One example (N = 1), sigmoid MLPs with biases and an MSE "
             "cost. Operations: scalar mul + add + other, counted exactly (docs/complexity.md). Times: "
             "median of repeats on this machine; `*` = extrapolated (operations x the seconds per "
             "operation of the largest measured run of that method), not run.\n")
    L.append("## When the path method passes 1 s, 1 hour, 1 year\n")
    L.append("Networks (w, w, ..., w, 1) of depth L: w^L input-to-output paths. The depth is the first "
             "at which the path method's time (measured where it ran, else extrapolated) passes the "
             "mark; backprop's operations at that depth are shown for contrast.\n")
    L.append("| width w | ns per op (from) | 1 s | 1 hour | 1 year | backprop ops at the 1-year depth |")
    L.append("|---:|---:|---:|---:|---:|---:|")
    for e in th:
        cells = []
        for name, _ in THRESHOLDS:
            d = e[name]
            cells.append(f"L = {d['depth']}{'' if d['measured'] else '*'} ({fmt_time(d['time_s'])})")
        L.append(f"| {e['width']} | {e['seconds_per_op'] * 1e9:.2f} ({e['rate_from']}) | " + " | ".join(cells)
                 + f" | {e['1 year']['backprop_ops']:,} |")
    L.append("\n## Realistic shapes\n")
    L.append("| network | params | input-output paths | method | operations | forward passes | time |")
    L.append("|---|---:|---:|---|---:|---:|---:|")
    for (kind, widths), ms in by.items():
        if kind != "shape":
            continue
        for m in METHODS:
            r = ms[m]
            mark = "*" if r["time_source"] == "extrapolated" else ""
            L.append(f"| {widths} | {r['n_params']:,} | {r['io_paths']:,} | {m} | {r['ops']:,} | "
                     f"{r['forward_passes']:,.1f} | {fmt_time(r['time_s'])}{mark} |")
    L.append("\n## Depth sweep\n")
    L.append("Operations (and time) per method; `forward passes` = operations / one forward pass.\n")
    L.append("| network | params | paths per example | paths ops | fin. diff. ops | fwd. mode ops | backprop ops "
             "| backprop in forward passes | paths time | backprop time |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (kind, widths), ms in by.items():
        if kind != "depth":
            continue
        p, b = ms["paths"], ms["backprop"]
        L.append(f"| {widths} | {p['n_params']:,} | {p['param_paths']:,} | {p['ops']:,} | "
                 f"{ms['finite_differences']['ops']:,} | {ms['forward_mode']['ops']:,} | {b['ops']:,} | "
                 f"{b['forward_passes']:.2f} | {fmt_time(p['time_s'])}"
                 f"{'*' if p['time_source'] == 'extrapolated' else ''} | {fmt_time(b['time_s'])} |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def plot_ops(rows, widths_shown, path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13.5, 5.4))
    styles = ["-", "--", ":", "-."]
    for w, ls in zip(widths_shown, styles):
        for m in METHODS:
            rs = [r for r in rows if r["sweep"] == "depth" and r["width"] == w and r["method"] == m]
            a1.plot([r["depth"] for r in rs], [r["ops"] for r in rs], ls, marker="o", ms=3, color=COLOR[m],
                    label=LABEL[m] if w == widths_shown[0] else None)
        a1.plot([], [], ls, color="black", label=f"width w = {w}")
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.set_yscale("log")
    a1.set_xlabel("depth L (dense layers)")
    a1.set_ylabel("scalar operations for the whole gradient")
    a1.set_title("Operations vs depth, nets (w, ..., w, 1), one example\n"
                 "paths: exponential (straight lines); backprop: linear in L")
    a1.grid(True, which="major", alpha=0.3)
    a1.legend(fontsize=7.5, loc="upper left")
    for m in METHODS:
        rs = [r for r in rows if r["method"] == m]
        a2.scatter([r["n_params"] for r in rs], [r["ops"] for r in rs], s=14, color=COLOR[m], label=LABEL[m],
                   alpha=0.8)
    for r in rows:
        if r["sweep"] == "shape" and r["method"] == "paths":
            a2.annotate(r["widths"], (r["n_params"], r["ops"]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    ps = np.array(sorted({r["n_params"] for r in rows}), float)
    a2.plot(ps, 6 * ps, "k:", lw=1, label="6 P (linear)")
    a2.plot(ps, 6 * ps ** 2, "k--", lw=1, label="6 P² (quadratic)")
    a2.set_xscale("log")
    a2.set_yscale("log")
    a2.set_xlabel("number of parameters P")
    a2.set_ylabel("scalar operations for the whole gradient")
    a2.set_title("Operations vs number of parameters (every net of the study)")
    a2.grid(True, which="major", alpha=0.3)
    a2.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_time(rows, th, widths, focus, path):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13.5, 5.4))
    cmap = plt.get_cmap("viridis")
    for k, w in enumerate(widths):
        color = cmap(k / max(1, len(widths) - 1) * 0.9)
        rate = next(e["seconds_per_op"] for e in th if e["width"] == w)
        rs = [r for r in rows if r["sweep"] == "depth" and r["width"] == w and r["method"] == "paths"]
        meas = [r for r in rs if r["time_source"] == "measured"]
        a1.plot([r["depth"] for r in meas], [r["time_s"] for r in meas], "o-", color=color, ms=4,
                label=f"w = {w} measured")
        top = next(e["1 year"]["depth"] for e in th if e["width"] == w)
        d0 = max(r["depth"] for r in meas) if meas else 1
        ds = np.arange(d0, top + 1)
        ts = [rate * px.path_ops(net_for((w,) * int(d) + (1,)), 1).total for d in ds]
        a1.plot(ds, ts, "--", color=color, lw=1.2, alpha=0.9)
    for name, secs in THRESHOLDS:
        a1.axhline(secs, color="k", lw=0.8, ls=":")
        a1.text(0.6, secs * 1.6, name, fontsize=8)
    a1.set_yscale("log")
    a1.set_xlabel("depth L")
    a1.xaxis.get_major_locator().set_params(integer=True)
    a1.set_ylabel("wall time of the path method (s)")
    a1.set_title("Path method on this machine: measured (dots) and\n"
                 "extrapolated (dashed: operations x measured seconds per operation)")
    a1.grid(True, alpha=0.3)
    a1.legend(fontsize=7.5, loc="lower right")
    for m in METHODS:
        rs = [r for r in rows if r["sweep"] == "depth" and r["width"] == focus and r["method"] == m]
        meas = [r for r in rs if r["time_source"] == "measured"]
        extr = [r for r in rs if r["time_source"] == "extrapolated"]
        a2.plot([r["depth"] for r in meas], [r["time_s"] for r in meas], "o-", color=COLOR[m], ms=4,
                label=LABEL[m])
        if extr:
            a2.plot([r["depth"] for r in extr], [r["time_s"] for r in extr], "o--", mfc="none",
                    color=COLOR[m], ms=4, label=f"{m} (extrapolated)")
    a2.set_yscale("log")
    a2.xaxis.get_major_locator().set_params(integer=True)
    a2.set_xlabel("depth L")
    a2.set_ylabel("wall time (s), median of repeats")
    a2.set_title(f"All four methods, nets ({focus}, ..., {focus}, 1): median wall time\n"
                 "(small runs are dominated by call overhead, not arithmetic)")
    a2.grid(True, alpha=0.3)
    a2.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_influence(path, widths=(4, 4, 4, 4, 1), layer=0, i=1, j=2):
    """The fully connected net with one weight's influence paths, from the enumeration."""
    model = cx.mlp(widths, "sigmoid", bias=False)
    params, x, _ = data(cx.mlp(widths, "sigmoid", bias=True), seed=3)
    params = tuple({"w": p["w"]} if p else p for p in params)
    y = jnp.asarray([[0.8]])
    ps = px.influence_paths(model, params, x, y, layer, i, j)
    _, grads = jp.value_and_grad(model.net, jp.mse())(params, x, y)
    bp = float(grads[model.dense_index(layer)]["w"][i, j])
    total = sum(p.product for p in ps)
    through, edge = {}, {}                                     # counts from the enumeration
    for p in ps:
        route = p.neurons
        for t, s in enumerate(route):
            through[(layer + 1 + t, s)] = through.get((layer + 1 + t, s), 0) + 1
            if t:
                e = ((layer + t, route[t - 1]), (layer + 1 + t, s))
                edge[e] = edge.get(e, 0) + 1
    fig, ax = plt.subplots(figsize=(11, 5.6))
    pos = {(l, s): (2.6 * l, (widths[l] - 1) / 2 - s) for l in range(len(widths)) for s in range(widths[l])}
    for l in range(len(widths) - 1):
        for a in range(widths[l]):
            for b in range(widths[l + 1]):
                (x0, y0), (x1, y1) = pos[(l, a)], pos[(l + 1, b)]
                n = edge.get(((l, a), (l + 1, b)), 0)
                if (l, a, b) == (layer, i, j):
                    ax.plot([x0, x1], [y0, y1], color="#d62728", lw=4, zorder=2)
                elif n:
                    ax.plot([x0, x1], [y0, y1], color="#ff9896", lw=0.8 + 0.5 * n, zorder=1)
                    if n > 1:
                        ax.text(x0 + 0.62 * (x1 - x0), y0 + 0.62 * (y1 - y0), str(n), fontsize=8,
                                color="#b22222", ha="center", va="center", zorder=3,
                                bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.8))
                else:
                    ax.plot([x0, x1], [y0, y1], color="#dddddd", lw=0.7, zorder=0)
    for (l, s), (xx, yy) in pos.items():
        n = through.get((l, s), 0)
        ax.add_patch(plt.Circle((xx, yy), 0.22, facecolor="#ffd8d8" if n else "white", edgecolor="black",
                                zorder=4))
        ax.text(xx, yy, str(n) if n else "", ha="center", va="center", fontsize=9, zorder=5)
    ax.plot([pos[(len(widths) - 1, 0)][0] + 0.22, pos[(len(widths) - 1, 0)][0] + 1.4], [0, 0], "k-", lw=1)
    ax.text(pos[(len(widths) - 1, 0)][0] + 1.6, 0, "J", fontsize=13, va="center")
    for l in range(len(widths)):
        ax.text(2.6 * l, -(max(widths) - 1) / 2 - 0.65, "input X0" if l == 0 else (
                "output Y" if l == len(widths) - 1 else f"hidden X{l}"), ha="center", fontsize=9, color="#555")
    ax.text(0, -(max(widths) - 1) / 2 - 1.15, "circled numbers and edge labels: how many of the paths "
            "run through that neuron / edge (edges without a label: 1)", fontsize=8, color="#555")
    n_io = px.input_output_paths(widths)
    ax.set_title(f"dJ/dW{layer}[{i},{j}] (thick red) in a {'-'.join(map(str, widths))} network: "
                 f"{len(ps)} paths to the cost (= {' x '.join(map(str, widths[layer + 2:]))})\n"
                 f"sum of the {len(ps)} path products = {total:.12f};  backprop (jp.value_and_grad) = {bp:.12f}\n"
                 f"all {widths[0] * widths[1]} weights of W0 together: {n_io} paths = every input-output path "
                 f"(4^4 x 1); with 12 layers of width 4: 4^12 = {4 ** 12:,}", fontsize=10)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return len(ps), total, bp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sweep (< 30 s)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=None,
                    help="longest predicted run of the path method, seconds (default 4; --quick 0.3)")
    ap.add_argument("--max-ops", type=float, default=None,
                    help="largest operation count run for the other methods (default 4e9; --quick 3e7)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per run (median)")
    args = ap.parse_args(argv)
    args.command = "python -m experiments.studies.complexity" + (" --quick" if args.quick else "")
    if args.quick:
        args.widths, args.max_depth, args.shapes, args.extend = (2, 4), 5, REALISTIC[:1], False
        args.budget, args.max_ops = args.budget or 0.3, args.max_ops or 3e7
    else:
        args.widths, args.max_depth, args.shapes, args.extend = (2, 3, 4, 6, 8), 12, REALISTIC, True
        args.budget, args.max_ops = args.budget or 4.0, args.max_ops or 4e9
    os.makedirs(args.out, exist_ok=True)
    print(f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs; "
          f"budget {args.budget} s per run; output {args.out}\n")

    n_paths, total, bp = plot_influence(os.path.join(args.out, "influence_paths.png"))
    print(f"influence_paths.png: dJ/dW0[1,2] of 4-4-4-4-1 = sum of {n_paths} path products {total:.12f}; "
          f"backprop {bp:.12f}\n")
    assert abs(total - bp) <= 1e-12

    rows, timer = sweep(args)
    th = thresholds(rows, args.widths, timer)
    print("\nThe path method on this machine (first depth past each mark; * = extrapolated):")
    for e in th:
        cells = [f"{name}: L = {e[name]['depth']}{'' if e[name]['measured'] else '*'}" for name, _ in THRESHOLDS]
        print(f"  width {e['width']}: {e['seconds_per_op'] * 1e9:6.2f} ns/op   " + "   ".join(cells))

    write_csv(rows, os.path.join(args.out, "complexity.csv"))
    write_markdown(rows, th, args, os.path.join(args.out, "complexity.md"))
    shown = tuple(w for w in (2, 4, 8) if w in args.widths)
    plot_ops(rows, shown, os.path.join(args.out, "complexity_ops.png"))
    plot_time(rows, th, args.widths, 4, os.path.join(args.out, "complexity_time.png"))
    summary = dict(command=args.command, jax=jax.__version__, backend=jax.default_backend(),
                   cpus=os.cpu_count(), machine=platform.machine(), python=sys.version.split()[0],
                   budget_s=args.budget, max_ops=args.max_ops,
                   seconds_per_op={m: timer.rate[(m, None)][1] for m in METHODS if (m, None) in timer.rate},
                   thresholds=th,
                   realistic={r["widths"] + " " + r["method"]: dict(ops=r["ops"], time_s=None if math.isnan(
                                                                        r["time_s"]) else r["time_s"],
                                                                    time_source=r["time_source"])
                              for r in rows if r["sweep"] == "shape"})
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    for name in ("complexity.csv", "complexity.md", "summary.json", "complexity_ops.png",
                 "complexity_time.png", "influence_paths.png"):
        print(f"wrote {os.path.join(args.out, name)}")


if __name__ == "__main__":
    main()

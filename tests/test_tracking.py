"""A run's record: env.json (what produced it; eval.py warns on another stack) and --report-to
tensorboard, whose event files hold each metrics.jsonl line under TRL's names."""
import json
import os
import subprocess
import sys

import pytest

import checkpoint
import tracking

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-logs", "20", "--sft-steps", "3", "--sft-window-steps", "0", "--iters", "2", "--scenarios", "2", "--k", "2",
        "--d-model", "16", "--n-layer", "1", "--vocab-size", "300", "--cs-samples", "2"]


def test_env_json_and_tensorboard(tmp_path, cli_env):
    pytest.importorskip("tensorboard")
    out = subprocess.run([sys.executable, "train.py", *TINY, "--out", str(tmp_path), "--run", "r",
                          "--report-to", "tensorboard"], cwd=ROOT, env=cli_env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "r"
    env = json.loads((run / "env.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert env["commit"] == head and isinstance(env["dirty"], bool)
    assert env["argv"][0] == "train.py" and "--report-to" in env["argv"]
    assert set(env["versions"]) == {"python", "torch", "transformers", "peft", "datasets"}
    assert env["versions"]["torch"] and env["device"].startswith("cpu") and env["threads"] >= 1
    assert checkpoint.stack_warning(str(run)) is None
    env["versions"]["torch"] = "1.0.0"
    (run / "env.json").write_text(json.dumps(env))
    warning = checkpoint.stack_warning(str(run))
    assert "\n" not in warning and "torch 1.0.0 ->" in warning

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name, value in tracking.scalars(lines[-1]).items():
        got = {e.step: e.value for e in events.Scalars(name)}
        assert got[lines[-1]["iter"]] == pytest.approx(value, rel=1e-6), name   # float32 in the event file
    assert {"train/loss", "train/rewards/chosen", "train/R"} <= set(events.Tags()["scalars"])
    assert all(len(events.Scalars(k)) == len(lines) for k in ("train/R", "train/tse"))

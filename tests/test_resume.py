"""Hardening: resume after SIGKILL, atomic checkpoints, the non-finite guard, determinism."""
import json
import os
import subprocess
import sys

import pytest
import torch

import checkpoint
import lm
from conftest import kill_after

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n-logs", "40", "--sft-steps", "20", "--iters", "8", "--scenarios", "2", "--k", "3",
        "--d-model", "32", "--vocab-size", "400"]


def train_cmd(out, run, *extra):
    return [sys.executable, "train.py", *TINY, "--out", str(out), "--run", run, *extra]


def metrics(run_dir):
    """metrics.jsonl without the wall-clock field (the one thing allowed to differ)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def weights(folder):
    model, _ = lm.load(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_env):
    """Three runs side by side: seed 0 left alone, seed 0 again, seed 1; then a seed-0 run killed
    with SIGKILL in the middle of GOPO and resumed."""
    out = tmp_path_factory.mktemp("runs")
    procs = {name: subprocess.Popen(train_cmd(out, name, *extra), cwd=ROOT, env=cli_env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, extra in (("alone", ()), ("again", ()), ("seed1", ("--seed", "1")))}
    for name, proc in procs.items():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    killed = subprocess.Popen(train_cmd(out, "killed"), cwd=ROOT, env=cli_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = out / "killed" / "metrics.jsonl"
    kill_after(killed, path, 3)
    done_before = len(path.read_text().splitlines())
    assert done_before < 8
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(out / "killed")], cwd=ROOT,
                             env=cli_env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return out, done_before


def test_resume_after_sigkill_matches_the_run_left_alone(runs):
    out, done_before = runs
    assert 3 <= done_before < 8
    assert metrics(out / "killed") == metrics(out / "alone")
    a, b = weights(str(out / "killed" / "expert")), weights(str(out / "alone" / "expert"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_same_seed_same_metrics_other_seed_differs(runs):
    out, _ = runs
    assert len(metrics(out / "alone")) == 8
    assert metrics(out / "alone") == metrics(out / "again")
    assert metrics(out / "alone") != metrics(out / "seed1")


def test_resume_carries_a_run_past_its_turn_budget_as_if_started_with_the_larger_one(runs, cli_env):
    """A run stopped by --turn-budget, resumed with a larger one (and one more --keep-at point), ends
    with the metrics of the run left alone up to that budget: a 1x run grows to 2x without replaying 1x."""
    out, _ = runs
    alone = metrics(out / "alone")
    t1, t2 = alone[2]["agent_turns"], alone[5]["agent_turns"]
    short = subprocess.run(train_cmd(out, "grown", "--turn-budget", str(t1), "--keep-at", str(t1)), cwd=ROOT,
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert short.returncode == 0, short.stderr[-2000:]
    assert metrics(out / "grown") == alone[:3]
    lower = subprocess.run([sys.executable, "train.py", "--resume", str(out / "grown"), "--turn-budget", str(t1)],
                           cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert lower.returncode == 2 and "must raise the run's own budget" in lower.stderr
    assert len(lower.stderr.strip().splitlines()) == 1 and metrics(out / "grown") == alone[:3]
    grown = subprocess.run([sys.executable, "train.py", "--resume", str(out / "grown"), "--turn-budget", str(t2),
                            "--keep-at", str(t2)], cwd=ROOT, env=cli_env, capture_output=True, text=True, timeout=300)
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert metrics(out / "grown") == alone[:6]
    config = json.loads((out / "grown" / "config.json").read_text())
    assert (config["turn_budget"], config["keep_at"]) == (t2, [t1, t2])
    for t in (t1, t2):
        assert (out / "grown" / f"at-{t}" / "expert" / "model.safetensors").is_file()


def test_a_run_made_before_the_newer_flags_resumes_with_their_old_behaviour(runs, tmp_path):
    """A config.json written before --device-batch-size, LoRA and --report-to existed lacks them; it
    resumes with the defaults that do what the code did then, and any other missing setting is refused."""
    import train
    out, _ = runs
    config = json.loads((out / "alone" / "config.json").read_text())
    old = {k: v for k, v in config.items() if k not in checkpoint.ADDED_SETTINGS}
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    p = train.parser(checkpoint.methods_of("train"))
    _, args = checkpoint.resume_run(p.parse_args(["--resume", str(tmp_path / "old")]), p)
    assert {k: getattr(args, k) for k in checkpoint.ADDED_SETTINGS} == checkpoint.ADDED_SETTINGS
    assert all(p.get_default(k) == v for k, v in checkpoint.ADDED_SETTINGS.items())
    del old["beta"]
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    with pytest.raises(SystemExit):
        checkpoint.resume_run(p.parse_args(["--resume", str(tmp_path / "old")]), p)


def test_a_crash_during_a_save_leaves_the_old_checkpoint(tmp_path, tok, models):
    expert_model, _ = models
    folder = str(tmp_path / "expert")
    checkpoint.save_model(expert_model, tok, folder)
    before = weights(folder)

    def dies_half_way(tmp):
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # the process dies here
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_dir(folder, dies_half_way)
    for k, v in weights(folder).items():      # the old checkpoint is what loads
        assert torch.equal(v, before[k])
    # a crash between the two renames: only folder.old is left; recover() puts it back
    os.replace(folder, folder + ".old")
    checkpoint.recover(folder)
    assert not os.path.exists(folder + ".tmp") and not os.path.exists(folder + ".old")
    for k, v in weights(folder).items():
        assert torch.equal(v, before[k])


def test_non_finite_losses_skip_steps_then_stop_with_the_last_state_intact(tmp_path, monkeypatch, capsys):
    import gopo
    import train
    nan_loss = lambda pc, pr, rc, rr, beta: ((pc - pr) * float("nan"), pc.detach(), pr.detach())
    monkeypatch.setattr(gopo, "preference_loss", nan_loss)
    with pytest.raises(SystemExit) as stop:
        train.main([*TINY, "--out", str(tmp_path), "--run", "nan", "--max-nonfinite", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "non-finite" in err and "2 iterations in a row" in err
    run = tmp_path / "nan"
    rows = metrics(run)
    assert len(rows) == 2 and all(r["nonfinite_steps"] == 2 and r["loss"] is None for r in rows)
    state, sft = weights(str(run / "state" / "expert")), weights(str(run / "expert_sft"))
    for k in sft:                              # no NaN reached the weights: still the SFT Expert
        assert torch.equal(state[k], sft[k])


def test_resume_reads_the_runs_own_logs_not_the_original_logs_file(tmp_path, cli_env):
    """A run trained on --logs FILE resumes after FILE is gone: the run keeps its own logs.jsonl."""
    import data
    from worlds import shop
    logs = tmp_path / "mine.jsonl"
    data.write_jsonl([shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in range(30)], str(logs))
    short = ["--sft-steps", "2", "--sft-window-steps", "1", "--iters", "1", "--scenarios", "2", "--k", "2",
             "--d-model", "16", "--vocab-size", "300", "--cs-samples", "0"]
    base = [sys.executable, "train.py", *short, "--out", str(tmp_path), "--run", "r"]
    run = subprocess.run([*base, "--logs", str(logs)], cwd=ROOT, env=cli_env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    os.remove(logs)
    resumed = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "r")], cwd=ROOT,
                             env=cli_env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert len(metrics(tmp_path / "r")) == 1

"""Learning curves at equal simulated turns (docs/forks.md): `train.py --turn-budget --keep-at` on a
tiny run, `eval.py` on each kept checkpoint, and `python -m experiments.curves` over them."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ["--n-logs", "30", "--sft-steps", "4", "--sft-window-steps", "2", "--scenarios", "2", "--k", "2",
        "--d-model", "16", "--n-layer", "1", "--vocab-size", "300", "--cs-samples", "2"]


def run_cli(args, env):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.fixture(scope="module")
def arms(tmp_path_factory, cli_env):
    """sft/s0, then arm A0-s0 from it with --turn-budget 60 --keep-at 20,60, each kept checkpoint
    evaluated on 4 held-out customers."""
    out = tmp_path_factory.mktemp("curves")
    run_cli(["train.py", "--method", "sft", "--out", str(out), "--run", "sft/s0", *TINY], cli_env)
    run_cli(["train.py", "--sft-from", str(out / "sft" / "s0"), "--out", str(out / "arms"), "--run", "A0-s0",
             "--iters", "50", "--turn-budget", "60", "--keep-at", "20,60", *TINY], cli_env)
    for t in (20, 60):
        run_cli(["eval.py", str(out / "arms" / "A0-s0" / f"at-{t}"), "--n-scenarios", "4"], cli_env)
    return out


def test_turn_budget_stops_at_the_first_iteration_that_reaches_it(arms):
    lines = [json.loads(x) for x in (arms / "arms" / "A0-s0" / "metrics.jsonl").read_text().splitlines()]
    turns = [m["agent_turns"] for m in lines]
    assert turns == sorted(turns) and turns[-1] >= 60 > turns[-2], turns
    assert len(lines) < 50


def test_each_kept_checkpoint_is_the_model_of_the_iteration_that_crossed_its_mark(arms, cli_env):
    """at-<T>/ holds the Expert as it was after the first iteration whose agent_turns reached T: its
    weights differ from the final Expert's unless T was crossed by the last iteration."""
    import torch
    from safetensors.torch import load_file
    run = arms / "arms" / "A0-s0"
    turns = [json.loads(x)["agent_turns"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    final = load_file(str(run / "expert" / "model.safetensors"))
    for t in (20, 60):
        kept = load_file(str(run / f"at-{t}" / "expert" / "model.safetensors"))
        crossed = next(i for i, n in enumerate(turns) if n >= t)
        same = all(torch.equal(kept[k], final[k]) for k in final)
        assert same == (crossed == len(turns) - 1), (t, crossed, len(turns))


def test_kept_checkpoints_carry_the_runs_training_data(arms):
    """An at-<T>/ folder is a run folder: a prompted planner's --planner-shots read its logs.jsonl."""
    run = arms / "arms" / "A0-s0"
    for t in (20, 60):
        assert (run / f"at-{t}" / "logs.jsonl").read_bytes() == (run / "logs.jsonl").read_bytes()
        assert not (run / f"at-{t}" / "split.json").exists()   # a built-in world has no split


def test_training_side_rule_reads_the_last_five_iterations_up_to_each_mark(arms, cli_env):
    """curves' train_tse: on_policy/tse averaged over the 5 iterations up to the one that crossed the
    mark (the training-side rule; no held-out customer in it), and the seeds that logged it."""
    from experiments import curves
    lines = [json.loads(x) for x in (arms / "arms" / "A0-s0" / "metrics.jsonl").read_text().splitlines()]
    for t in (20, 60):
        crossed = next(i for i, m in enumerate(lines) if m["agent_turns"] >= t)
        window = [m["on_policy/tse"] for m in lines[max(0, crossed - 4):crossed + 1]]
        line, _, rule = curves.at_mark(str(arms / "arms" / "A0-s0"), t)
        assert line == lines[crossed] and rule == pytest.approx(sum(window) / len(window))


def test_curves_pool_the_kept_checkpoints_against_the_ceiling(arms, cli_env):
    """experiments.curves: gap closed = sum(arm - SFT) / sum(ceiling - SFT) over the customers, read
    from each checkpoint's eval_gopo/eval_sft dialogues and the seed's ceilings.json (written here)."""
    from experiments import curves
    ceiling = [0.9, 0.8, 0.95, 0.85]
    (arms / "sft" / "s0" / "ceilings.json").write_text(json.dumps({"per_scenario_tse": {"ceiling": ceiling}}))
    stdout = run_cli(["-m", "experiments.curves", str(arms / "arms"), "--sft", str(arms / "sft"),
                      "--bootstrap", "200", "--png", str(arms / "curves.png")], cli_env)
    rows = json.loads((arms / "arms" / "curves.json").read_text())
    assert [(r["arm"], r["turns"], r["seeds"]) for r in rows] == [("A0", 20, [0]), ("A0", 60, [0])]
    for r in rows:
        folder = str(arms / "arms" / "A0-s0" / f"at-{r['turns']}")
        a, s = curves.customer_tse(folder, "gopo"), curves.customer_tse(folder, "sft")
        assert r["gap_closed"] == pytest.approx(sum(x - y for x, y in zip(a, s)) / sum(c - y for c, y in zip(ceiling, s)))
        assert r["gap_ci95"][0] <= r["gap_closed"] <= r["gap_ci95"][1]
        assert r["train_tse_seeds"] == [0]
        assert r["train_tse"] == pytest.approx(curves.at_mark(str(arms / "arms" / "A0-s0"), r["turns"])[2])
        assert f"| A0 | {r['turns']:,} (" in stdout
    assert (arms / "curves.png").stat().st_size > 0


def test_bench_turn_cost_times_each_batch_size_side_by_side(arms, cli_env, tmp_path):
    """experiments.bench --batch-sizes: seconds per simulated agent turn of one rollout batch of each
    size, relative to the first (the turn-cost measurement of issue 27)."""
    path = tmp_path / "turn_cost.json"
    stdout = run_cli(["-m", "experiments.bench", "--run", str(arms / "arms" / "A0-s0"), "--batch-sizes", "2,4",
                      "--k", "2", "--repeats", "1", "--threads", "1", "--json", str(path)], cli_env)
    res = json.loads(path.read_text())
    assert res["turn_cost_batch_sizes"] == [2, 4] and res["turn_cost_relative"][0] == 1.0
    assert all(t > 0 for t in res["turn_cost_turns"]) and "4 dialogues:" in stdout
    assert res["turn_cost_s_per_turn"] == pytest.approx([s / t for s, t in zip(res["turn_cost_s"], res["turn_cost_turns"])])

"""The ceilings probe (experiments/ceilings.py) and what it stands on: the disclosed policy, the
relabelled SFT targets, the decision groups, template play; and its bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

import data
import expert as expert_lib
import lm
import serialize
import tse
import worlds
from worlds import desk
from conftest import ROOT, hf_env
from experiments import ceilings

LOGS = [desk.play(desk.make_scenario(s), desk.behaviour_policy) for s in data.train_seeds(40)]
HELD_OUT = [desk.make_scenario(s) for s in data.test_seeds(200)]


def agent_turns(rec):
    return [t for t in rec["turns"] if t["role"] == "agent"]


def desk_tok(records):
    texts = [t["text"] for r in records for t in r["turns"]] + list(desk.INSTRUCTIONS.values())
    return lm.train_tokenizer(texts, desk.STRATEGIES, vocab_size=512)


def test_disclosed_policy_reads_no_scenario_and_misses_the_oracle_only_where_the_stack_is_hidden():
    """Called with scenario=None it cannot read a hidden fact; it departs from the oracle only by
    asking "anything else?" where the oracle knows the stack is empty and closes."""
    differ = set()
    for sc in HELD_OUT:
        for policy in (desk.oracle_policy, desk.behaviour_policy):
            rec = desk.play(sc, policy)
            for turn, tr in zip(agent_turns(rec), desk.read(rec["turns"])):
                seen, truth = desk.disclosed_policy(tr, None), desk.oracle_policy(tr, sc)
                if seen != truth:
                    differ.add((desk.decision_group(tr), truth, seen))
    assert differ == {("request stack", "close", "anything_else"), ("voucher/tier", "close", "anything_else")}
    rec = desk.play(HELD_OUT[0], desk.disclosed_policy)
    assert rec["success"] and rec["sop_ok"]


def test_relabelled_targets_are_the_label_policys_choices_sop_allowed_on_the_logged_history():
    relabelled = worlds.relabel(desk, LOGS)
    changed = 0
    for rec, logged in zip(relabelled, LOGS):
        assert [{k: v for k, v in t.items() if k != "label"} for t in rec["turns"]] == logged["turns"]
        zs = [t["strategy"] for t in agent_turns(rec)]
        tr = desk.Tracker()   # an independent replay of the logged dialogue
        tr.update(None, rec["turns"][0]["text"], "disclose")
        for i, turn in enumerate(agent_turns(rec)):
            assert turn["label"] == desk.disclosed_policy(tr, None)
            assert turn["label"] in desk.allowed(zs[:i])
            changed += turn["label"] != turn["strategy"]
            customer = rec["turns"][2 * i + 2]
            tr.update(turn["strategy"], customer["text"], customer["event"])
    assert changed > 0
    tok = desk_tok(LOGS)
    for rec, logged in zip(relabelled[:5], LOGS):
        traj = expert_lib.trajectory_from_record(tok, rec, desk.STRATEGIES, desk.allowed, desk.INSTRUCTIONS)
        base = expert_lib.trajectory_from_record(tok, logged, desk.STRATEGIES, desk.allowed, desk.INSTRUCTIONS)
        assert [desk.STRATEGIES[k] for _, k in traj["decisions"]] == [t["label"] for t in agent_turns(rec)]
        assert traj["ids"] == base["ids"] and torch.equal(traj["allowed"], base["allowed"])
        assert [p for p, _ in traj["decisions"]] == [p for p, _ in base["decisions"]]


def test_the_group_table_adds_up_to_the_overall_decision_accuracy():
    records = [desk.play(sc, policy) for sc in HELD_OUT[:60] for policy in desk.POLICIES.values()]
    acc = worlds.decision_accuracy(desk, records)
    assert list(acc) == [*desk.DECISION_GROUPS, "all"]
    assert acc["all"] == [sum(acc[g][0] for g in desk.DECISION_GROUPS), sum(acc[g][1] for g in desk.DECISION_GROUPS)]
    flat = [taken == label for rec in records for _, taken, label in worlds.decisions(desk, rec)]
    assert acc["all"] == [sum(flat), len(flat)] and 0 < sum(flat) < len(flat)
    assert acc["all"][1] == sum(len(agent_turns(r)) for r in records)
    oracle = worlds.decision_accuracy(desk, [desk.play(sc, desk.disclosed_policy) for sc in HELD_OUT[:60]])
    assert all(c == n for c, n in oracle.values())   # the label policy agrees with itself
    from worlds import shop   # a world without groups has one
    rec = shop.play(shop.make_scenario(0), shop.oracle_policy)
    assert worlds.decision_accuracy(shop, [rec]) == {"all": [len(agent_turns(rec))] * 2}   # each decision once


def test_template_play_is_the_worlds_own_dialogue_with_the_experts_choices():
    for sc in HELD_OUT[:10]:
        rec = desk.play(sc, desk.oracle_policy)
        assert ceilings.follow(desk, sc, rec["ref_strategies"]) == (rec["turns"], True)
        assert ceilings.follow(desk, sc, rec["ref_strategies"][:3]) == (rec["turns"][:7], False)
    tok = desk_tok(LOGS)
    model = lm.build_tiny_model(tok, d_model=32, n_layer=1, n_head=2, max_len=4096, seed=0)
    lm.add_strategy_tokens(model, tok, desk.STRATEGIES)
    model.eval()
    records = ceilings.template_play(model, tok, desk, HELD_OUT[:8])
    for rec, sc in zip(records, HELD_OUT[:8]):
        zs = [t["strategy"] for t in agent_turns(rec)]
        assert all(z in desk.allowed(zs[:i]) for i, z in enumerate(zs))
        assert rec == desk.play(sc, ceilings._fixed(zs))
        # each choice is the model's greedy SOP-masked decision on the history so far
        traj = expert_lib.trajectory_from_record(tok, rec, desk.STRATEGIES, desk.allowed, desk.INSTRUCTIONS)
        ids = [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in desk.STRATEGIES]
        with torch.no_grad():
            logps = expert_lib.decision_dists(model, expert_lib.collate([traj], tok.pad_token_id, len(ids)), ids)
        assert logps[0].argmax(-1).tolist() == [k for _, k in traj["decisions"]]


def teacher_forced(model, tok, w, records):
    """worlds.decision_accuracy's counts for the model's greedy choice on each relabelled history."""
    ids = [tok.convert_tokens_to_ids(serialize.strategy_token(z)) for z in w.STRATEGIES]
    counts = {g: [0, 0] for g in worlds.decision_groups(w)}
    with torch.no_grad():
        trajs = [expert_lib.trajectory_from_record(tok, r, w.STRATEGIES, w.allowed, w.INSTRUCTIONS) for r in records]
        pred = expert_lib.decision_dists(model, expert_lib.collate(trajs, tok.pad_token_id, len(ids)), ids).argmax(-1)
    for j, rec in enumerate(records):
        for t, (g, _, label) in enumerate(worlds.decisions(w, rec)):
            counts[g][0] += int(pred[j, t]) == w.STRATEGIES.index(label)
            counts[g][1] += 1
    return {g: c / max(n, 1) for g, (c, n) in counts.items()}


def test_the_ceiling_expert_beats_the_sft_expert_on_its_groups():
    """A small desk (horizon 10: one request; 2 paraphrases): the same tiny Expert and SFT budget
    on the behaviour logs' own labels and on the relabelled ones; decision accuracy on held-out
    behaviour dialogues (teacher-forced, against the disclosed policy). The behaviour policy gives
    every complainer a voucher 70% of the time and names a model before asking the budget, so SFT
    copies those habits; the ceiling learns the tier where the voucher needs it. Measured here,
    SFT -> ceiling, natively / under ATEN_CPU_CAPABILITY=default (1 thread each): voucher/tier
    0.512 / 0.537 -> 1.000 / 1.000, rest 0.792 / 0.793 -> 0.977 / 0.975, eligibility 0.647 / 0.647
    -> 0.784 / 0.706, request stack 0.980 / 0.985 -> 1.000 / 1.000."""
    w = desk.make_world(horizon=10, paraphrases=2)
    logs = [w.play(w.make_scenario(s), w.behaviour_policy) for s in data.train_seeds(300)]
    held = worlds.relabel(w, [w.play(w.make_scenario(s), w.behaviour_policy) for s in data.test_seeds(150)])
    tok = desk_tok(logs)
    acc = {}
    for name, train in (("sft", logs), ("ceiling", worlds.relabel(w, logs))):
        torch.manual_seed(0)
        model = lm.build_tiny_model(tok, d_model=64, n_layer=2, n_head=2, max_len=4096, seed=0)
        lm.add_strategy_tokens(model, tok, w.STRATEGIES)
        expert_lib.sft(model, tok, train, w.STRATEGIES, w.allowed, w.INSTRUCTIONS, steps=300, batch_size=16,
                       lr=3e-3, seed=0)
        model.eval()
        acc[name] = teacher_forced(model, tok, w, held)
    print("LEARNS ceiling vs sft by group:", {n: {g: round(a, 3) for g, a in v.items()} for n, v in acc.items()})
    assert acc["ceiling"]["voucher/tier"] - acc["sft"]["voucher/tier"] > 0.25, acc
    assert acc["ceiling"]["rest"] - acc["sft"]["rest"] > 0.08, acc
    assert all(acc["ceiling"][g] >= acc["sft"][g] - 0.02 for g in acc["sft"]), acc


def one_line_error(args):
    p = subprocess.run([sys.executable, "-m", "experiments.ceilings", *args], cwd=ROOT, env=hf_env(),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ceilings.py: error: "), p.stderr
    return lines[0]


def test_ceilings_refuses_a_folder_that_is_not_a_run_and_a_real_data_run(tmp_path):
    assert "does not exist" in one_line_error([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    assert "not a train.py run" in one_line_error([str(tmp_path / "empty")])
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({"algo": "gopo", "data": "mgshop", "data_path": "x.json"}))
    before = sorted(os.listdir(real))
    assert "no oracle" in one_line_error([str(real)])
    assert sorted(os.listdir(real)) == before
    assert "--n" in one_line_error([str(real), "--n", "0"])


def test_the_probe_end_to_end_on_a_tiny_desk_run(tmp_path):
    """A tiny desk run (--rollouts branch), then the probe and experiments.pairs: the reports have the
    issue's keys, each value a number; metrics.jsonl has each decision group's accuracy. The oracle's
    TSE and success are recomputed here from the world's own oracle dialogues on the same held-out
    customers (tse.trajectory_metrics with the run's values.json), and every reported TSE mean, the
    paired ceiling - SFT difference and the share of the gap closed agree with the per-scenario TSEs."""
    env = hf_env()
    train = [sys.executable, "train.py", "--world", "desk", "--out", str(tmp_path), "--run", "r", "--n-logs", "30",
             "--d-model", "32", "--n-layer", "1", "--vocab-size", "512", "--sft-steps", "6", "--agent-sft-steps", "6",
             "--expert-sft-steps", "6", "--sft-window-steps", "3", "--iters", "1", "--scenarios", "2", "--k", "2",
             "--cs-samples", "2", "--max-reply-tokens", "8", "--rollouts", "branch"]
    p = subprocess.run(train, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    p = subprocess.run([sys.executable, "-m", "experiments.ceilings", str(tmp_path / "r"), "--n", "4"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads((tmp_path / "r" / "ceilings.json").read_text())
    for key in ("tse", "tse_template", "success"):
        assert isinstance(report["expert_ceiling"][key], float)
    # the oracle row, independently: the desk's default world (the run's: no --horizon, --paraphrases)
    values = json.loads((tmp_path / "r" / "values.json").read_text())
    oracle = [desk.play(desk.make_scenario(s), desk.oracle_policy) for s in data.test_seeds(4)]
    per_oracle = [tse.trajectory_metrics(rec, values, desk.HORIZON)["tse"] for rec in oracle]
    assert report["oracle"]["tse"] == pytest.approx(sum(per_oracle) / 4, abs=1e-9), (report["oracle"], per_oracle)
    assert report["oracle"]["success"] == pytest.approx(sum(r["success"] for r in oracle) / 4, abs=1e-9)
    assert 0 < report["oracle"]["tse"] <= 1 and len(set(per_oracle)) > 1
    # the reported means are the means of the per-scenario TSEs, and the gap is computed from them
    per = report["per_scenario_tse"]
    mean = lambda xs: sum(xs) / len(xs)   # noqa: E731
    for row, key in (("expert_ceiling", "ceiling"), ("sft", "sft"), ("method", "method")):
        assert report[row]["tse"] == pytest.approx(mean(per[key]), abs=1e-9), (row, report[row], per[key])
        assert report[row]["tse_ci95"][0] <= report[row]["tse"] <= report[row]["tse_ci95"][1]
    assert report["ceiling_minus_sft_tse"][0] == pytest.approx(mean(per["ceiling"]) - mean(per["sft"]), abs=1e-9)
    gap = mean(per["ceiling"]) - mean(per["sft"])
    if gap > 0:
        assert report["gap_closed"] == pytest.approx((mean(per["method"]) - mean(per["sft"])) / gap, abs=1e-9)
    else:
        assert report["gap_closed"] is None
    for key in ("tse", "success"):
        assert isinstance(report["cs_ceiling"][key], float)
    assert set(report["groups"]) == {*desk.DECISION_GROUPS, "all"}
    for g in report["groups"].values():
        assert all(isinstance(g[k], float) for k in ("sft", "method", "ceiling"))
    assert (tmp_path / "r" / "expert_ceiling" / "config.json").exists()
    assert "Decision accuracy" in p.stdout
    assert all(len(report["per_scenario_tse"][k]) == 4 for k in ("ceiling", "sft", "method"))
    metrics = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert {f"acc/{g}" for g in (*desk.DECISION_GROUPS, "all")} <= set(metrics)
    p = subprocess.run([sys.executable, "-m", "experiments.pairs", str(tmp_path / "r"), "--scenarios", "3"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    pairs = json.loads((tmp_path / "r" / "pairs.json").read_text())
    assert list(pairs["modes"]) == ["independent", "branch, entropy", "branch, uniform", "branch, entropy, segment 1"]
    for m in pairs["modes"].values():
        assert 0 <= m["scenarios_with_a_pair"] <= 1 and isinstance(m["decisions_per_dialogue"], float)


def test_the_probe_starts_from_the_two_agent_sft_rows():
    """The SFT start the probe compares with is the Expert's (row "sft"), also on an sft run, whose
    last eval row is its flat agent (a flat row here scored the SFT start 0.296 against 0.312 on 40
    desk customers)."""
    assert ceilings.probe_rows("sft") == ("sft",)
    assert ceilings.probe_rows("gopo") == ("gopo", "sft") and ceilings.probe_rows("gopo")[-1] == "sft"

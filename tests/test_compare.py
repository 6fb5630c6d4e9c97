"""The baselines through the command lines: `train.py --algo sft|gopo` and `python -m
experiments.baselines --algo ppo|memento|gopo-noexpert` with --sft-from, `eval.py RUN` or `python -m
experiments.baselines eval RUN` on each, and `python -m experiments.compare` pooling seeds (tiny runs)."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TINY = ["--n-logs", "30", "--sft-steps", "4", "--sft-window-steps", "2", "--iters", "2", "--scenarios", "2",
        "--k", "2", "--d-model", "16", "--n-layer", "1", "--vocab-size", "300", "--cs-samples", "2"]
ALGOS = ["gopo", "ppo", "memento", "gopo-noexpert"]


def entry(algo):
    """The command that trains --algo: train.py for gopo and sft, the baselines' own entry point otherwise."""
    return ["train.py"] if algo in ("gopo", "sft") else ["-m", "experiments.baselines"]


def run_cli(args, env, timeout=300):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cli_env):
    """out/sft/s{0,1} (--algo sft, seeds 0 and 1), then every method of seed 0 and gopo and ppo of
    seed 1, each from its seed's SFT run; then experiments.compare on the five method folders."""
    out = tmp_path_factory.mktemp("compare")
    sft = lambda s: ["train.py", "--algo", "sft", "--seed", str(s), "--out", str(out), "--run", f"sft/s{s}", *TINY]
    method = lambda a, s: [*entry(a), "--algo", a, "--seed", str(s), "--out", str(out), "--run", f"{a}/s{s}",
                           "--sft-from", str(out / "sft" / f"s{s}"), *TINY]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(("sft0", "sft1"), pool.map(lambda a: run_cli(a, cli_env), [sft(0), sft(1)])))
        jobs = {f"{a}{s}": method(a, s) for a in ALGOS for s in (0, 1) if s == 0 or a in ("gopo", "ppo")}
        jobs["variant"] = [*method("gopo", 0)[:-len(TINY)], "--alpha", "1", *TINY]
        jobs["variant"][jobs["variant"].index("gopo/s0")] = "gopo-alpha1/s0"
        results.update(zip(jobs, pool.map(lambda a: run_cli(a, cli_env), jobs.values())))
    for name, (rc, _, err) in results.items():
        assert rc == 0, (name, err[-3000:])
    compare = run_cli(["-m", "experiments.compare", *(str(out / m) for m in ["sft", "ppo", "memento", "gopo-noexpert", "gopo",
                                                                      "gopo-alpha1"]),
                       "--n-scenarios", "4", "--bootstrap", "200"], cli_env)
    assert compare[0] == 0, compare[2][-3000:]
    return out, results, compare


def test_each_method_writes_its_checkpoints_and_curves(runs):
    from transformers import AutoModelForCausalLM
    out, _, _ = runs
    expected = {"sft": ["expert_sft", "agent_sft", "flat_sft"], "gopo": ["expert", "agent", "expert_sft", "agent_sft"],
                "ppo": ["flat", "flat_sft", "value_head.pt"], "gopo-noexpert": ["flat", "flat_sft"],
                "memento": ["bank.pt", "expert_sft", "agent_sft"]}
    for algo, files in expected.items():
        run = out / algo / "s0"
        for f in files + ["config.json", "curves.png", "time.json", "sft.json"]:
            assert (run / f).exists(), (algo, f)
        config = json.loads((run / "config.json").read_text())
        assert config["method"] == algo and config["seed"] == 0
        if algo != "sft":
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert len(rows) == 2 and all({"R", "tse", "esndcg", "success", "seconds"} <= set(r) for r in rows)
        for d in files:
            if not d.endswith(".pt"):
                AutoModelForCausalLM.from_pretrained(str(run / d))
    # --sft-from copies the checkpoints: every method of a seed starts from the same SFT weights
    for algo, name in (("gopo", "expert_sft"), ("memento", "agent_sft"), ("ppo", "flat_sft")):
        a = (out / "sft" / "s0" / name / "model.safetensors").read_bytes()
        assert (out / algo / "s0" / name / "model.safetensors").read_bytes() == a, (algo, name)
    assert (out / "sft" / "s0" / "flat_sft" / "model.safetensors").read_bytes() != \
        (out / "sft" / "s1" / "flat_sft" / "model.safetensors").read_bytes()


def test_compare_pools_seeds_and_reports_budget_and_relative_tse(runs):
    out, _, (rc, stdout, _) = runs
    for f in ("compare.md", "compare.json", "compare.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    c = json.loads((out / "compare.json").read_text())
    rows = ["sft", "sft-flat", "ppo", "memento", "gopo-noexpert", "gopo", "behaviour", "oracle"]
    for m in rows:
        for k in ("tse", "success", "esndcg", "gre", "turns", "sop_ok"):
            assert set(c[m][k]) == {"mean", "ci95"}, (m, k)
    for m in ("sft-flat", "ppo", "gopo-noexpert"):     # no strategy asked for: GRE does not apply
        assert c[m]["gre"]["mean"] is None
    assert c["gopo"]["gre"]["mean"] is not None
    assert c["budget"]["rollouts_after_sft"] == 2 * 2 * 2 and c["budget"]["sft_dialogues"] == 30
    assert c["budget"]["expert_sft_steps"] == 4     # the shop's Expert SFT runs --sft-steps
    assert c["budget"]["seeds"] == {"sft": [0, 1], "ppo": [0, 1], "memento": [0], "gopo-noexpert": [0], "gopo": [0, 1],
                                    "gopo-alpha1": [0]}
    assert len(c["per_seed_tse"]["gopo"]) == 2 and len(c["per_seed_tse"]["memento"]) == 1
    # pooled over seeds: the pooled mean is the mean of the per-seed means (same scenarios per seed)
    assert c["gopo"]["tse"]["mean"] == pytest.approx(sum(c["per_seed_tse"]["gopo"]) / 2)
    for b in ("ppo", "memento", "gopo-noexpert", "sft"):
        r = c["relative_tse"][b]
        assert r["mean"] == pytest.approx(c["gopo"]["tse"]["mean"] / c[b]["tse"]["mean"])
        assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] + 1e-9
    # a folder named after a method plus a suffix is a variant row; GOPO's relative TSE is given for it too
    assert c["budget"]["seeds"]["gopo-alpha1"] == [0] and "gopo-alpha1" in c
    assert set(c["relative_tse_by_gopo_row"]) == {"gopo", "gopo-alpha1"}
    assert c["relative_tse_by_gopo_row"]["gopo"] == c["relative_tse"] and "gopo-alpha1" not in c["relative_tse"]
    assert c["relative_tse_by_gopo_row"]["gopo-alpha1"]["ppo"]["mean"] == \
        pytest.approx(c["gopo-alpha1"]["tse"]["mean"] / c["ppo"]["tse"]["mean"])
    assert all(c[m]["sop_ok"]["mean"] == 1.0 for m in ("behaviour", "oracle"))     # template text, SOP policies
    assert all(0.0 <= c[m]["sop_ok"]["mean"] <= 1.0 for m in rows)
    md = (out / "compare.md").read_text()
    assert "Relative TSE" in md and all(m in md for m in rows) and md.strip() in stdout.strip() + "\n"


def test_single_run_eval_of_each_method(runs, cli_env):
    """The baselines' runs (and sft's flat row) through their entry point's eval, the same eval.py."""
    out, _, _ = runs
    rows = {"sft": ["sft", "sft-flat"], "ppo": ["ppo", "sft-flat"], "memento": ["memento", "sft"],
            "gopo-noexpert": ["gopo-noexpert", "sft-flat"]}
    evaluate = lambda a: run_cli(["-m", "experiments.baselines", "eval", str(out / a / "s0"), "--n-scenarios", "3"],
                                 cli_env)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(rows, pool.map(evaluate, rows)))
    for algo, methods in rows.items():
        rc, _, err = results[algo]
        assert rc == 0, (algo, err[-3000:])
        ev = json.loads((out / algo / "s0" / "eval.json").read_text())
        for m in methods + ["behaviour", "random", "oracle"]:
            assert m in ev, (algo, m)
        for m in methods:
            assert (out / algo / "s0" / f"eval_{m}.jsonl").is_file()


def test_compare_refuses_unequal_budgets_and_mixed_folders(runs, cli_env, tmp_path):
    """One line, exit 2: runs with another rollout budget or Expert SFT, a folder mixing methods, a
    folder with no run, two folders of one method."""
    out, _, _ = runs
    other = tmp_path / "ppo_k3"
    shutil.copytree(out / "ppo" / "s0", other / "s0")
    config = json.loads((other / "s0" / "config.json").read_text())
    (other / "s0" / "config.json").write_text(json.dumps({**config, "k": 3}))
    other_sft = tmp_path / "ppo_expert_sft"     # another Expert SFT recipe is another start, not the same budget
    shutil.copytree(out / "ppo" / "s0", other_sft / "s0")
    (other_sft / "s0" / "config.json").write_text(json.dumps({**config, "expert_sft_steps": 600}))
    mixed = tmp_path / "mixed"
    shutil.copytree(out / "ppo" / "s0", mixed / "a")
    shutil.copytree(out / "memento" / "s0", mixed / "b")
    (tmp_path / "empty").mkdir()
    cases = {
        "budget": ([str(out / "gopo"), str(other)], ["--k"]),
        "expert_sft": ([str(out / "gopo"), str(other_sft)], ["--expert-sft-steps"]),
        "mixed": ([str(out / "gopo"), str(mixed)], ["mixes"]),
        "empty": ([str(out / "gopo"), str(tmp_path / "empty")], ["holds no train.py run"]),
        "twice": ([str(out / "gopo"), str(out / "gopo" / "s0")], ["two folders"]),
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(cases, pool.map(lambda c: run_cli(["-m", "experiments.compare", *c[0], "--n-scenarios", "2",
                                                               "--out", str(tmp_path / "report")], cli_env),
                                           cases.values())))
    for name, (args, needles) in cases.items():
        rc, stdout, stderr = results[name]
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert rc == 2 and len(lines) == 1 and lines[0].startswith("compare.py: error:"), (name, stderr[-2000:])
        assert all(n in lines[0] for n in needles), (name, lines[0])
    assert not (tmp_path / "report").exists()


def test_sop_ok_reads_the_recognised_acts():
    import eval as eval_lib
    from worlds import shop
    turn = lambda role, text: {"role": role, "text": text, "strategy": None, "event": None}
    ok = {"turns": [turn("customer", "Hi."), turn("agent", "Hello and welcome to our shop!"),
                    turn("customer", "Hi."), turn("agent", "What are you looking for today?")]}
    skipped_greet = {"turns": [turn("customer", "Hi."), turn("agent", "What are you looking for today?")]}
    upsell_too_soon = {"turns": [turn("customer", "Hi."), turn("agent", "Hi there, welcome!"), turn("customer", "Hi."),
                                 turn("agent", "Would you like to add our protection plan?")]}
    unrecognised = {"turns": [turn("customer", "Hi."), turn("agent", "Hi there, welcome!"), turn("customer", "Hi."),
                              turn("agent", "blue sky")]}
    assert eval_lib.sop_ok(ok, shop) == 1.0
    for rec in (skipped_greet, upsell_too_soon, unrecognised):
        assert eval_lib.sop_ok(rec, shop) == 0.0
    # every logged behaviour-policy dialogue keeps to the SOP
    recs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in range(50)]
    assert all(eval_lib.sop_ok(r, shop) == 1.0 for r in recs)


def test_grid_tabulates_each_cells_relative_tse(runs, cli_env, tmp_path):
    """experiments/grid.py reads each cell's compare.json (here the fixture's, as two cells) and writes
    grid.md with GOPO's ratios and CIs over ppo and the ablation, and grid.png."""
    out, _, _ = runs
    c = json.loads((out / "compare.json").read_text())
    for cell in ("h10-p2", "h24-p20"):
        (tmp_path / cell).mkdir()
        shutil.copy(out / "compare.json", tmp_path / cell / "compare.json")
    (tmp_path / "notes").mkdir()                                   # not a cell: ignored
    rc, stdout, err = run_cli(["-m", "experiments.grid", str(tmp_path)], cli_env)
    assert rc == 0, err[-2000:]
    md = (tmp_path / "grid.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| 10 ") or line.startswith("| 24 ")]
    assert len(rows) == 2 and rows[0].startswith("| 10 | 2 |") and rows[1].startswith("| 24 | 20 |")
    for b in ("ppo", "gopo-noexpert"):
        r = c["relative_tse"][b]
        assert f"{r['mean']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]" in rows[0]
    assert (tmp_path / "grid.png").stat().st_size > 0 and md.strip() in stdout
    rc, _, err = run_cli(["-m", "experiments.grid", str(tmp_path / "notes")], cli_env)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "no cell" in err


def test_ceiling_gap_is_the_pooled_share_of_the_gap_computed_by_hand(tmp_path):
    """experiments.compare.ceiling_gap (README "Results": GOPO closes 0.14 [0.07, 0.22] of the gap),
    on hand-made TSEs of 2 seeds x 3 scenarios, each seed's ceilings.json written here. Per scenario,
    averaged over the seeds: method m = (0.4, 0.4, 0.4), sft s = (0.3, 0.2, 0.2), ceiling c = (0.7,
    0.8, 0.7). The share is sum(m - s) / sum(c - s) = 0.5 / 1.5 = 1/3 (not the mean of the per-seed
    shares, 0.353 and 0.308, nor of the per-scenario shares, 0.328); the paired gains are 0.5 / 3
    (method - sft) and 1.5 / 3 (ceiling - sft)."""
    from experiments import compare
    method = [[0.5, 0.4, 0.3], [0.3, 0.4, 0.5]]
    sft = [[0.2, 0.3, 0.1], [0.4, 0.1, 0.3]]
    ceiling = [[0.8, 0.6, 0.9], [0.6, 1.0, 0.5]]
    runs = []
    for seed, c in enumerate(ceiling):
        run = tmp_path / f"s{seed}"
        run.mkdir()
        (run / "ceilings.json").write_text(json.dumps({"per_scenario_tse": {"ceiling": c, "sft": sft[seed],
                                                                            "method": method[seed]}}))
        runs.append((str(run), {"seed": seed}))
    g = compare.ceiling_gap(runs, method, sft, 3, 400)
    assert g["mean"] == pytest.approx(1 / 3, abs=1e-12)
    # any resample's share is a mediant of the per-scenario shares 0.1/0.4, 0.2/0.6, 0.2/0.5
    lo, hi = g["ci95"]
    assert 0.25 - 1e-12 <= lo <= 1 / 3 <= hi <= 0.4 + 1e-12 and lo < hi, g["ci95"]
    assert g["gain"][0] == pytest.approx(0.5 / 3, abs=1e-12)
    assert g["ceiling_minus_sft"][0] == pytest.approx(1.5 / 3, abs=1e-12)
    # a method that closes a quarter of every scenario's gap: a quarter, with a zero-width interval
    flat = compare.ceiling_gap(runs, [[0.3 + 0.1, 0.2 + 0.15, 0.2 + 0.125]] * 2, [[0.3, 0.2, 0.2]] * 2, 3, 400)
    assert flat["mean"] == pytest.approx(0.25, abs=1e-12)
    assert flat["ci95"] == pytest.approx([0.25, 0.25], abs=1e-12)
    # a method below its SFT start closes a negative share
    assert compare.ceiling_gap(runs, sft, method, 3, 400)["mean"] == pytest.approx(-0.5 / 1.0, abs=1e-12)
    # no ceilings.json for a seed, or one for another number of scenarios: no share
    assert compare.ceiling_gap(runs, method, sft, 4, 400) is None
    (tmp_path / "s1" / "ceilings.json").unlink()
    assert compare.ceiling_gap(runs, method, sft, 3, 400) is None

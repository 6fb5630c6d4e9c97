"""The command lines: bad input is one line on stderr and exit status 2 (never a traceback), data
errors name what to fix, and a tiny end-to-end train.py -> eval.py run writes every promised file.

Every CLI call imports torch/transformers (~4 s of CPU), so the calls of this module are
started together (a few at a time) in module-scoped fixtures and the tests only read their results.
"""
import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

import checkpoint
import data
from worlds import shop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TIMEOUT = 300


def run_cli(args, env):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=TIMEOUT)
    return p.returncode, p.stdout, p.stderr


def good_record(seed=0):
    return shop.play(shop.make_scenario(seed), shop.behaviour_policy)


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


@pytest.fixture(scope="module")
def bad_logs(tmp_path_factory):
    """Three JSONL files of logged dialogues, each with one defect: (path, what the message must name)."""
    d = tmp_path_factory.mktemp("logs")
    ok = json.dumps(good_record(0))
    missing = good_record(1)
    del missing["success"]
    unknown = good_record(2)
    next(t for t in unknown["turns"] if t["role"] == "agent")["strategy"] = "tap_dance"
    return {
        "malformed": (write_lines(d / "malformed.jsonl", [ok, ok, '{"id": "x", "turns": [', ok]), "line 3"),
        "missing": (write_lines(d / "missing.jsonl", [ok, json.dumps(missing)]), "'success'"),
        "unknown": (write_lines(d / "unknown.jsonl", [json.dumps(unknown)]), "'tap_dance'"),
    }


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory):
    """An output folder that already holds a run: its files and their mtimes, to check nothing moved."""
    out = tmp_path_factory.mktemp("out")
    run = out / "taken"
    run.mkdir()
    (run / "config.json").write_text('{"algo": "gopo", "note": "the earlier run"}\n')
    (run / "metrics.jsonl").write_text('{"iter": 0, "R": 0.5}\n')
    snapshot = {f: ((run / f).read_text(), (run / f).stat().st_mtime_ns) for f in os.listdir(run)}
    return out, run, snapshot


@pytest.fixture(scope="module")
def no_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("half_run")
    (d / "config.json").write_text("{}\n")
    (d / "values.json").write_text('{"purchase": 1.0}\n')
    return d


@pytest.fixture(scope="module")
def error_runs(cli_env, bad_logs, existing_run, no_checkpoint, tmp_path_factory):
    """name -> (exit status, stdout, stderr) of each bad invocation, run concurrently (with the smoke
    test's train.py run, whose result is under "smoke_train")."""
    out, _, _ = existing_run
    fresh = tmp_path_factory.mktemp("fresh_out")
    smoke_out = tmp_path_factory.mktemp("smoke_out")
    cases = {
        "smoke_train": ["train.py", "--n-logs", "40", "--sft-steps", "5", "--iters", "1", "--scenarios", "2",
                        "--k", "2", "--d-model", "32", "--n-layer", "2", "--vocab-size", "400",
                        "--out", str(smoke_out), "--run", "smoke"],
        "help": ["train.py", "--help"],
        "algo": ["train.py", "--algo", "no_such_algo", "--out", str(fresh)],
        "model": ["train.py", "--model", "no/such-model", "--out", str(fresh)],
        "k0": ["train.py", "--k", "0", "--out", str(fresh)],
        "iters_neg": ["train.py", "--iters", "-2", "--out", str(fresh)],
        "exists": ["train.py", "--out", str(out), "--run", "taken", "--n-logs", "5", "--sft-steps", "1",
                   "--iters", "1", "--scenarios", "1", "--k", "2", "--d-model", "16", "--n-layer", "1"],
        "eval_no_ckpt": ["eval.py", str(no_checkpoint), "--n-scenarios", "2"],
    }
    for name, (path, _) in bad_logs.items():  # train.py --logs, which its --help must list
        cases[f"logs_{name}"] = ["train.py", "--logs", path, "--out", str(fresh), "--run", name]
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(run_cli, args, cli_env) for name, args in cases.items()}
        results = {name: f.result() for name, f in futures.items()}
    results["_fresh"] = fresh
    results["_smoke_run"] = smoke_out / "smoke"
    # --help lists --logs as an option (a line of the options list starts with it; a mention elsewhere does not count)
    results["_has_logs"] = re.search(r"^ +--logs(?![\w-])", results["help"][1], re.M) is not None
    return results


def assert_one_line_error(result, prog, *needles):
    rc, stdout, stderr = result
    assert rc == 2, (rc, stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"{prog}: error:"), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("case, needles", [
    ("algo", ["--algo", "no_such_algo"]),
    ("model", ["--model", "no/such-model"]),
    ("k0", ["--k", "0"]),
    ("iters_neg", ["--iters", "-2"]),
])
def test_bad_train_arguments_exit_2_with_one_line(error_runs, case, needles):
    assert_one_line_error(error_runs[case], "train.py", *needles)
    # nothing was written for a rejected command line
    assert os.listdir(error_runs["_fresh"]) == []


def test_existing_run_folder_is_refused_and_left_untouched(error_runs, existing_run):
    _, run, snapshot = existing_run
    line = assert_one_line_error(error_runs["exists"], "train.py", "--overwrite")
    assert str(run) in line or "taken" in line
    assert sorted(os.listdir(run)) == sorted(snapshot)
    for f, (text, mtime) in snapshot.items():
        assert (run / f).read_text() == text and (run / f).stat().st_mtime_ns == mtime


def test_eval_without_checkpoint_exits_2(error_runs, no_checkpoint):
    assert_one_line_error(error_runs["eval_no_ckpt"], "eval.py", str(no_checkpoint))
    assert sorted(os.listdir(no_checkpoint)) == ["config.json", "values.json"]


# ----------------------------------------------------------------------------- logged-dialogue files
@pytest.mark.parametrize("case", ["malformed", "missing", "unknown"])
def test_read_jsonl_errors_name_the_problem(bad_logs, case):
    path, needle = bad_logs[case]
    with pytest.raises(data.DataError) as e:
        data.read_jsonl(path, strategies=shop.STRATEGIES, events=shop.EVENTS)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg
    assert path in msg


def test_read_jsonl_accepts_the_simulators_own_records(tmp_path):
    recs = [good_record(s) for s in range(3)]
    data.write_jsonl(recs, str(tmp_path / "ok.jsonl"))
    assert data.read_jsonl(str(tmp_path / "ok.jsonl"), strategies=shop.STRATEGIES, events=shop.EVENTS) == recs


@pytest.mark.parametrize("case", ["malformed", "missing", "unknown"])
def test_train_logs_flag_rejects_bad_files(error_runs, bad_logs, case):
    assert error_runs["_has_logs"], "`train.py --help` does not list --logs (renamed or removed?)"
    _, needle = bad_logs[case]
    assert_one_line_error(error_runs[f"logs_{case}"], "train.py", needle)
    assert not os.path.exists(os.path.join(error_runs["_fresh"], case))


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def smoke_run(cli_env, error_runs):
    """The smoke train.py run folder, then `python eval.py RUN --n-scenarios 4` on it."""
    train = error_runs["smoke_train"]   # python train.py --n-logs 40 --sft-steps 5 --iters 1 ... (above)
    run = error_runs["_smoke_run"]
    assert train[0] == 0, train[2][-3000:]
    ev = run_cli(["eval.py", str(run), "--n-scenarios", "4"], cli_env)
    assert ev[0] == 0, ev[2][-3000:]
    return run, train, ev


def test_train_smoke_writes_a_loadable_run(smoke_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    run, train, _ = smoke_run
    for f in ("config.json", "logs.jsonl", "values.json", "metrics.jsonl", "curves.png"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    config = json.loads((run / "config.json").read_text())
    assert config["k"] == 2 and config["iters"] == 1 and config["method"] == "gopo"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1
    assert {"R", "tse", "esndcg", "gre", "loss", "pairs", "seconds"} <= set(rows[0])
    assert 0.0 <= rows[0]["R"] <= 1.0
    for d in ("expert", "agent", "expert_sft", "agent_sft"):
        model = AutoModelForCausalLM.from_pretrained(str(run / d))
        tok = AutoTokenizer.from_pretrained(str(run / d), padding_side="left")
        assert model.get_input_embeddings().weight.shape[0] >= len(tok)
        for z in shop.STRATEGIES:
            assert tok.convert_tokens_to_ids(f"<|strategy:{z}|>") != tok.unk_token_id


def test_eval_smoke_writes_report(smoke_run):
    run, _, _ = smoke_run
    for f in ("eval.json", "eval.md", "eval.png"):
        assert (run / f).is_file() and (run / f).stat().st_size > 0, f
    ev = json.loads((run / "eval.json").read_text())
    assert ev["n_scenarios"] == 4
    for method in ("gopo", "sft", "behaviour", "random", "oracle"):
        assert method in ev and ev[method], method
        for metric, v in ev[method].items():
            assert set(v) >= {"mean", "ci95"} and len(v["ci95"]) == 2, (method, metric)
            assert v["ci95"][0] <= v["mean"] + 1e-9 <= v["ci95"][1] + 2e-9
        for metric in ("tse", "success", "esndcg", "gre"):
            assert metric in ev[method]
    # the clairvoyant oracle (it defines z*) does not score below the random-valid policy
    assert ev["oracle"]["tse"]["mean"] >= ev["random"]["tse"]["mean"]
    md = (run / "eval.md").read_text()
    assert all(m in md for m in ("gopo", "sft", "behaviour", "random", "oracle"))


def test_every_interval_in_eval_json_lies_in_its_metrics_range(smoke_run):
    """Each row's per-dialogue values are rebuilt (the trained rows from eval_<row>.jsonl, the rule
    policies replayed on the same held-out scenarios): every score's CI lies within [min, max] of its
    values and has zero width where they are all equal; every rate's CI is Wilson's, inside [0, 1]."""
    import eval as eval_lib
    import tse
    run, _, _ = smoke_run
    ev = json.loads((run / "eval.json").read_text())
    config = checkpoint.read_config(str(run))
    world = checkpoint.world_of(config, str(run))
    values = checkpoint.read_values(str(run / "values.json"))
    scenarios = [world.make_scenario(s) for s in data.test_seeds(ev["n_scenarios"])]
    records = {row: data.read_jsonl(str(run / f"eval_{row}.jsonl")) for row in eval_lib.METHODS[config["method"]].rows}
    records.update({name: [world.play(s, policy, seed=0) for s in scenarios] for name, policy in world.POLICIES.items()})
    assert set(records) == {k for k in ev if isinstance(ev[k], dict) and "tse" in ev[k]}
    constant = 0
    for row, recs in records.items():
        per = eval_lib.per_dialogue(recs, values, world, flat=row in eval_lib.METHODS and eval_lib.is_flat(row))
        for metric, xs in per.items():
            if None in xs:          # GRE of a flat agent: no interval
                continue
            lo, hi = ev[row][metric]["ci95"]
            rate = metric in eval_lib.RATES
            low, high = (0.0, 1.0) if rate else (min(xs), max(xs))   # a rate at 0 of 4 may still be above 0
            assert low <= lo <= ev[row][metric]["mean"] <= hi <= high, (row, metric, xs, lo, hi)
            if rate:
                assert [lo, hi] == list(tse.rate_ci(xs)[1:]), (row, metric)
            elif len(set(xs)) == 1:
                assert lo == hi == xs[0], (row, metric, lo, hi)
                constant += 1
    assert constant > 0, "no constant score in the smoke run: the zero-width check checked nothing"


def test_eval_json_means_are_the_tse_metrics_of_the_written_dialogues(smoke_run):
    """eval.json's means and intervals, recomputed from what the run wrote (eval_<row>.jsonl for the
    trained rows; the rule policies replayed on the same held-out customers) with tse.py's metric and
    interval functions alone: tse.trajectory_metrics for TSE, ESNDCG, success and turns; GRE as the
    share of replies the world recognises as their strategy; tse.rate_ci (success) and
    tse.bootstrap_ci (the scores). Not through eval.py's per-dialogue code, as the test above does."""
    import tse
    run, _, _ = smoke_run
    ev = json.loads((run / "eval.json").read_text())
    config = json.loads((run / "config.json").read_text())
    values = json.loads((run / "values.json").read_text())
    assert config.get("world", "shop") == "shop" and ev["n_scenarios"] == 4
    scenarios = [shop.make_scenario(s) for s in data.test_seeds(4)]
    records = {row: data.read_jsonl(str(run / f"eval_{row}.jsonl")) for row in ("gopo", "sft")}
    records.update({name: [shop.play(s, policy, seed=0) for s in scenarios] for name, policy in shop.POLICIES.items()})
    for row, recs in records.items():
        assert len(recs) == 4 and [r["scenario"] for r in recs] == scenarios, row
        per = [tse.trajectory_metrics(r, values, shop.HORIZON) for r in recs]
        agent = [[t for t in r["turns"] if t["role"] == "agent"] for r in recs]
        gre = [sum(shop.recognise(t["text"]) == t["strategy"] for t in a) / len(a) if a else 0.0 for a in agent]
        for metric, xs, rate in (("tse", [m["tse"] for m in per], False), ("esndcg", [m["esndcg"] for m in per], False),
                                 ("turns", [m["turns"] for m in per], False), ("gre", gre, False),
                                 ("success", [m["success"] for m in per], True)):
            mean, lo, hi = tse.rate_ci(xs) if rate else tse.bootstrap_ci(xs)
            got = ev[row][metric]
            assert got["mean"] == pytest.approx(sum(xs) / len(xs), abs=1e-12), (row, metric, got, xs)
            assert got["mean"] == pytest.approx(mean, abs=1e-12) and got["ci95"] == pytest.approx([lo, hi], abs=1e-12), \
                (row, metric, got, (mean, lo, hi))

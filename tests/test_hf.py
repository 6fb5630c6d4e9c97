"""Hugging Face datasets, offline: a run's logs exported and read back equal, save_to_disk folders fed to
the loaders train.py calls, MultiWOZ 2.2's hub layout against the GitHub folder, bad folders, and the
core modules (a built-in world's training included) without `datasets` installed."""
import json
import os
import subprocess
import sys

import pytest

import data
import worlds
from worlds import desk
from worlds import shop
from conftest import ROOT, hf_env
from worlds import corpora, hf, logged

try:
    import datasets
except ImportError:   # the GPU image: only the test that needs no `datasets` runs
    datasets = None
needs_datasets = pytest.mark.skipif(datasets is None, reason="the datasets package is not installed")
MULTIWOZ = os.path.join(ROOT, "tests", "fixtures", "multiwoz")


@pytest.fixture(scope="module")
def run_logs(tmp_path_factory):
    """A run folder holding only logs.jsonl (all that export reads): shop and desk dialogues, whose
    scenarios have different keys (a desk request has optional ones) and extra keys (order_value, sop_ok)."""
    run = tmp_path_factory.mktemp("run")
    recs = [shop.play(shop.make_scenario(s), shop.behaviour_policy) for s in data.train_seeds(6)] + \
           [desk.play(desk.make_scenario(s), desk.behaviour_policy) for s in data.train_seeds(6)]
    data.write_jsonl(recs, str(run / "logs.jsonl"))
    return run, data.read_jsonl(str(run / "logs.jsonl"))


def export(*args):
    return subprocess.run([sys.executable, "-m", "worlds.export", *map(str, args)], cwd=ROOT, env=hf_env(),
                          capture_output=True, text=True, timeout=120)


@needs_datasets
def test_export_then_load_from_disk_gives_equal_records(run_logs):
    run, recs = run_logs
    p = export(run)
    assert p.returncode == 0, p.stderr[-2000:]
    folder = run / "logs_dataset"
    ds = datasets.load_from_disk(str(folder))   # datasets' own reader
    assert ds.num_rows == len(recs) and ds.column_names == list(hf.features())
    assert json.loads(ds[0]["scenario"]) == recs[0]["scenario"] and ds[0]["turns"] == recs[0]["turns"]
    back = hf.from_dataset(ds, str(folder))
    assert back == recs
    data.write_jsonl(back, str(run / "back.jsonl"))   # even the bytes: the keys come back in their order
    assert (run / "back.jsonl").read_bytes() == (run / "logs.jsonl").read_bytes()
    again = export(run)   # never replaced without --overwrite
    assert again.returncode == 2 and "--overwrite" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert export(run, "--overwrite").returncode == 0


@needs_datasets
def test_arrow_inference_would_not_round_trip(run_logs):
    """Why scenario and extra are JSON text: inferred structs give every desk request every key."""
    _, recs = run_logs
    assert datasets.Dataset.from_list(recs).to_list() != recs
    assert hf.from_dataset(hf.to_dataset(recs), "x") == recs


@needs_datasets
def test_dataset_folder_feeds_the_loaders(run_logs, tmp_path):
    """--logs DIR gives the built-in world the same logs as the JSONL file; --data records DIR splits
    as the JSONL does, or keeps a DatasetDict's own splits."""
    run, recs = run_logs
    folder = tmp_path / "shop"
    hf.to_dataset(recs[:6]).save_to_disk(str(folder))
    world, logs, splits = worlds.load_world("sim", logs=str(folder))
    assert logs == recs[:6] and splits is None
    with pytest.raises(data.DataError, match="unknown (strategy|event)"):   # checked against the world, as JSONL is
        worlds.load_world("sim", world="desk", logs=str(folder))

    every = tmp_path / "every"
    hf.to_dataset(recs).save_to_disk(str(every))
    assert logged.load_splits("records", str(every)) == logged.load_splits("records", str(run / "logs.jsonl")) \
        == corpora.mgshop_split(recs)
    split = tmp_path / "split"
    datasets.DatasetDict({"train": hf.to_dataset(recs[:8]), "validation": hf.to_dataset(recs[8:10]),
                          "test": hf.to_dataset(recs[10:])}).save_to_disk(str(split))
    assert logged.load_splits("records", str(split)) == {"train": recs[:8], "dev": recs[8:10], "test": recs[10:]}
    assert worlds.read_logs(str(split)) == recs[:8]   # --logs of a DatasetDict: its train split


def hub_layout(folder):
    """The GitHub MultiWOZ 2.2 folder in the Hugging Face layout (multi_woz_v22, config v2.2), written
    here from its dataset card's features: sequences of objects as objects of lists, the speaker as
    a class id, each turn's dialog_acts.json entry under dialogue_acts."""
    V, Seq = datasets.Value, datasets.Sequence
    features = datasets.Features({
        "dialogue_id": V("string"), "services": Seq(V("string")),
        "turns": Seq({"turn_id": V("string"), "speaker": datasets.ClassLabel(names=["USER", "SYSTEM"]),
                      "utterance": V("string"),
                      "frames": Seq({"service": V("string"),
                                     "state": {"active_intent": V("string"), "requested_slots": Seq(V("string")),
                                               "slots_values": Seq({"slots_values_name": V("string"),
                                                                    "slots_values_list": Seq(V("string"))})}}),
                      "dialogue_acts": {"dialog_act": Seq({"act_type": V("string"),
                                                           "act_slots": Seq({"slot_name": V("string"),
                                                                             "slot_value": V("string")})}),
                                        "span_info": Seq({"act_type": V("string"), "span_start": V("int32")})}})})

    def columns(items, keys):   # a list of objects -> an object of lists
        return {k: [item[k] for item in items] for k in keys}

    acts = json.load(open(os.path.join(folder, "dialog_acts.json")))
    splits = {}
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        rows = []
        for path in sorted(os.listdir(os.path.join(folder, split))):
            for dlg in json.load(open(os.path.join(folder, split, path))):
                turns = []
                for t in dlg["turns"]:
                    frames = []
                    for f in t["frames"]:
                        state = f.get("state", {"active_intent": "", "requested_slots": [], "slot_values": {}})
                        frames.append({"service": f["service"], "state": {
                            "active_intent": state["active_intent"], "requested_slots": state["requested_slots"],
                            "slots_values": {"slots_values_name": list(state["slot_values"]),
                                             "slots_values_list": list(state["slot_values"].values())}}})
                    entry = acts.get(dlg["dialogue_id"], {}).get(t["turn_id"], {})
                    # the released file (what the hub read) says dialog_act; one fixture dialogue uses the
                    # README's spelling, dialogue_acts, which corpora.load_multiwoz also accepts
                    dialog_act = entry.get("dialog_act", entry.get("dialogue_acts", {}))
                    turns.append({"turn_id": t["turn_id"], "speaker": ["USER", "SYSTEM"].index(t["speaker"]),
                                  "utterance": t["utterance"],
                                  "frames": columns(frames, ("service", "state")),
                                  "dialogue_acts": {"dialog_act": columns(
                                      [{"act_type": a, "act_slots": columns([{"slot_name": s, "slot_value": v}
                                                                             for s, v in pairs],
                                                                            ("slot_name", "slot_value"))}
                                       for a, pairs in dialog_act.items()], ("act_type", "act_slots")),
                                      "span_info": {"act_type": [], "span_start": []}}})
                rows.append({"dialogue_id": dlg["dialogue_id"], "services": dlg["services"],
                             "turns": columns(turns, ("turn_id", "speaker", "utterance", "frames", "dialogue_acts"))})
        splits[name] = datasets.Dataset.from_list(rows, features=features)
    return datasets.DatasetDict(splits)


@needs_datasets
def test_multiwoz_hub_layout_gives_the_github_records(tmp_path):
    folder = tmp_path / "multiwoz_hf"
    hub = hub_layout(MULTIWOZ)
    assert isinstance(hub["train"][0]["turns"], dict) and hub["train"][0]["turns"]["speaker"][0] == 0
    hub.save_to_disk(str(folder))
    want = corpora.load_multiwoz(MULTIWOZ)
    assert logged.load_splits("multiwoz", str(folder)) == want
    assert logged.load_splits("multiwoz", MULTIWOZ) == want   # the GitHub folder, as before
    records = tmp_path / "records"   # MultiWOZ in the record schema is --data records, not this layout
    datasets.DatasetDict({"train": hf.to_dataset(want["train"]), "validation": hf.to_dataset(want["dev"]),
                          "test": hf.to_dataset(want["test"])}).save_to_disk(str(records))
    with pytest.raises(data.DataError, match="goes with --data records"):
        logged.load_splits("multiwoz", str(records))
    assert logged.load_splits("records", str(records)) == want


@needs_datasets
def test_bad_folders_and_rows(tmp_path, run_logs, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("hello\n")
    with pytest.raises(data.DataError, match=r"neither the MultiWOZ 2\.2 folder .* nor a Hugging Face dataset"):
        logged.load_splits("multiwoz", str(plain))
    for load in (lambda p: logged.load_splits("records", p), worlds.read_logs):
        with pytest.raises(data.DataError, match="is a directory but not a Hugging Face dataset folder"):
            load(str(plain))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(data.DataError, match="hub id needs --no-offline"):
        logged.load_splits("records", "someone/their_corpus")
    with pytest.raises(data.DataError, match="no such file$"):   # a missing JSONL keeps its old message
        worlds.read_logs(str(tmp_path / "nope.jsonl"))

    wrong = tmp_path / "wrong"
    datasets.Dataset.from_list([{"text": "hi"}]).save_to_disk(str(wrong))
    with pytest.raises(data.DataError, match=r"no column 'id', 'source'.*common record schema"):
        worlds.read_logs(str(wrong))
    _, recs = run_logs
    bad = tmp_path / "bad_json"
    ds = hf.to_dataset(recs[:2]).map(lambda row, i: {"scenario": "{" if i else row["scenario"]}, with_indices=True)
    ds.save_to_disk(str(bad))
    with pytest.raises(data.DataError, match=r"row 1: column 'scenario' is not valid JSON"):
        worlds.read_logs(str(bad))
    with pytest.raises(data.DataError, match=r"record 0: turns\[0\] has keys beyond"):   # refused, not dropped
        hf.to_dataset([{**recs[0], "turns": [{**recs[0]["turns"][0], "mood": "calm"}]}])
    no_strategy = [{**r, "turns": [{**t, "strategy": None} for t in r["turns"]]} for r in recs]
    hf.to_dataset(no_strategy).save_to_disk(str(tmp_path / "no_strategy"))
    with pytest.raises(data.DataError, match="agent turn without a strategy"):
        logged.load_splits("records", str(tmp_path / "no_strategy"))


NO_DATASETS = r'''
import runpy, sys
for name in ("datasets", "pyarrow", "pandas"):   # as on a GPU image that has none of them
    sys.modules[name] = None                      # `import datasets` raises ImportError; find_spec says absent
sys.path.insert(0, ".")
import data, eval, train, worlds, worlds.corpora, worlds.hf, worlds.logged, worlds.export  # noqa
import experiments.baselines  # noqa
dataset_folder, tiny = sys.argv[1], sys.argv[2:]
for argv in (["train.py", "--help"], ["train.py", *tiny]):   # the help, then a tiny built-in run
    sys.argv = argv
    try:
        runpy.run_path("train.py", run_name="__main__")
    except SystemExit as e:
        assert not e.code, e.code
try:
    worlds.read_logs(dataset_folder)
except data.DataError as e:
    print("ERROR", e)
assert sys.modules["datasets"] is None
'''


TINY = ["--n-logs", "5", "--sft-steps", "1", "--sft-window-steps", "0", "--iters", "1", "--scenarios", "1",
        "--k", "2", "--d-model", "16", "--n-layer", "1", "--vocab-size", "300", "--cs-samples", "0"]


@pytest.fixture(scope="module")
def run_without_datasets(tmp_path_factory):
    """A tiny shop run (out/gopo) trained in a process where `datasets` cannot be imported."""
    out = tmp_path_factory.mktemp("no_datasets")
    folder = out / "a_dataset"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    p = subprocess.run([sys.executable, "-c", NO_DATASETS, str(folder), *TINY, "--out", str(out)], cwd=ROOT,
                       env=hf_env(), capture_output=True, text=True, timeout=300)
    return out, p


def test_core_modules_and_a_builtin_run_need_no_datasets(run_without_datasets):
    out, p = run_without_datasets
    assert p.returncode == 0, p.stderr[-3000:]
    assert "usage: train.py" in p.stdout and (out / "gopo" / "metrics.jsonl").is_file()
    # a dataset folder without the package: one line that says what to install
    assert "ERROR" in p.stdout and "needs the `datasets` package" in p.stdout


@needs_datasets
def test_an_exported_run_trains_again_from_its_dataset(run_without_datasets):
    """export -> train.py --logs DIR, same seed: the same logs.jsonl bytes, the same metrics.jsonl."""
    out, p = run_without_datasets
    assert p.returncode == 0, p.stderr[-3000:]
    first = out / "gopo"
    assert export(first, "--out", out / "shared").returncode == 0
    again = subprocess.run([sys.executable, "train.py", *TINY, "--out", str(out), "--run", "again",
                            "--logs", str(out / "shared")], cwd=ROOT, env=hf_env(), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "again" / "logs.jsonl").read_bytes() == (first / "logs.jsonl").read_bytes()

    def metrics(run):
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics(out / "again") == metrics(first)

"""Hugging Face datasets, both ways: the common record schema of data.py as a dataset, and the datasets
that train.py reads (`--logs`, `--data records`, `--data multiwoz`) from a save_to_disk folder or a hub id.

`datasets` (and pyarrow, pandas under it) is imported inside these functions only: the built-in
worlds train without it, as they must on a GPU image that does not have it.

The dataset form of a record (docs/real-data.md), one row per dialogue:

    id: string, source: string, success: bool, ref_strategies: list of string,
    turns: list of {role: string, text: string, strategy: string or null, event: string or null},
    scenario: string (the scenario dict as JSON), extra: string (the record's other keys as JSON)

`scenario` and `extra` are JSON text because Arrow gives every row of a column the same struct: the
scenarios of the shop, the desk and the corpora have different keys (a desk request has optional
ones), and Arrow would add every missing key as null, so records would not come back equal.
"""
import json
import os

from data import RECORD_FIELDS, TURN_FIELDS, DataError, validate_record

SCHEMA_HINT = "the common record schema: id, source, scenario, turns, success, ref_strategies (docs/real-data.md)"


def _datasets():
    """The `datasets` package, or a one-line error that says how to get it."""
    try:
        import datasets
    except ImportError:
        raise DataError("a Hugging Face dataset needs the `datasets` package (pip install -r requirements.txt); "
                        "JSONL files and the built-in worlds do not") from None
    datasets.disable_progress_bars()   # a CLI here prints one line per stage, not bars for a few MB
    return datasets


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def is_dataset_folder(path):
    """A folder written by Dataset.save_to_disk (state.json) or DatasetDict.save_to_disk (dataset_dict.json)."""
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def offline():
    """Whether the hub is off limits: train.py sets HF_DATASETS_OFFLINE=1 unless --no-offline."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def load(path):
    """{split name: Dataset} of a save_to_disk folder, or of a hub id when online. A plain Dataset
    (one split, no name) comes back as {"train": it}, the name the hub gives a single split."""
    if os.path.isdir(path):
        if not is_dataset_folder(path):
            raise DataError(f"{path}: is a directory but not a Hugging Face dataset folder (save_to_disk writes "
                            "state.json or dataset_dict.json in it)")
        try:
            ds = _datasets().load_from_disk(path)
        except DataError:
            raise
        except Exception as e:   # a damaged folder: pyarrow, json and OS errors alike
            raise DataError(f"{path}: cannot read it as a Hugging Face dataset ({_first_line(e)})") from None
    elif os.path.exists(path):
        raise DataError(f"{path}: is a file, not a Hugging Face dataset (save_to_disk writes a folder)")
    elif offline():
        raise DataError(f"{path}: no such file or folder (offline: a Hugging Face hub id needs --no-offline, "
                        "or save the dataset to a local folder with save_to_disk and pass that)")
    else:
        try:
            ds = _datasets().load_dataset(path)
        except DataError:
            raise
        except Exception as e:   # not on the hub, no network, a script-only dataset: one line each
            raise DataError(f"{path}: no such file or folder, and not a dataset the Hugging Face hub gave "
                            f"({_first_line(e)})") from None
    return dict(ds) if isinstance(ds, dict) else {"train": ds}   # a DatasetDict is a dict of splits


# ----------------------------------------------------------------------------- the common record schema
def features():
    """The Arrow schema of a record's row (the module docstring says why scenario and extra are JSON)."""
    Value, List = _datasets().Value, _datasets().List
    return _datasets().Features({
        "id": Value("string"), "source": Value("string"), "scenario": Value("string"),
        "turns": List({field: Value("string") for field in TURN_FIELDS}),
        "success": Value("bool"), "ref_strategies": List(Value("string")), "extra": Value("string")})


def to_dataset(records, where="records"):
    """Records -> a Dataset that `from_dataset` turns back into equal records. What the row cannot
    hold exactly is refused rather than changed: turn keys beyond the schema's, non-string strategies."""
    rows = []
    for i, rec in enumerate(records):
        rwhere = f"{where} record {i}"
        validate_record(rec, rwhere)
        for j, turn in enumerate(rec["turns"]):
            if set(turn) - set(TURN_FIELDS):
                raise DataError(f"{rwhere}: turns[{j}] has keys beyond {', '.join(TURN_FIELDS)} "
                                f"({', '.join(sorted(set(turn) - set(TURN_FIELDS)))}); the dataset form holds only those")
        if not all(isinstance(z, str) for z in rec["ref_strategies"]):
            raise DataError(f"{rwhere}: ref_strategies should be a list of strings")
        rows.append({"id": rec["id"], "source": rec["source"], "scenario": json.dumps(rec["scenario"]),
                     "turns": [{field: t[field] for field in TURN_FIELDS} for t in rec["turns"]],
                     "success": rec["success"], "ref_strategies": rec["ref_strategies"],
                     "extra": json.dumps({k: v for k, v in rec.items() if k not in RECORD_FIELDS})})
    return _datasets().Dataset.from_list(rows, features=features())


def _json_object(text, where, column):
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise DataError(f"{where}: column '{column}' is not valid JSON") from None
    if not isinstance(value, dict):
        raise DataError(f"{where}: column '{column}' should hold a JSON object, got {type(value).__name__}")
    return value


def from_dataset(ds, where, strategies=None, events=None):
    """A Dataset in the common record schema -> validated records. `scenario` may be JSON text (what
    to_dataset writes) or a struct (a dataset built by hand; Arrow then gives it every row's keys);
    `extra` (JSON text) is optional; any other column becomes a record key as it is."""
    missing = [c for c in RECORD_FIELDS if c not in ds.column_names]
    if missing:
        raise DataError(f"{where}: no column {', '.join(repr(c) for c in missing)}; expected {SCHEMA_HINT}")
    records = []
    for i, row in enumerate(ds):
        rwhere = f"{where} row {i}"
        rec = dict(row)
        if isinstance(rec["scenario"], str):
            rec["scenario"] = _json_object(rec["scenario"], rwhere, "scenario")
        extra = rec.pop("extra", None)
        if isinstance(extra, str):   # after the schema's keys, as the worlds write them: same JSONL bytes
            for key, value in _json_object(extra, rwhere, "extra").items():
                rec.setdefault(key, value)
        records.append(validate_record(rec, rwhere, strategies, events))
    if not records:
        raise DataError(f"{where}: no records in the dataset")
    return records


def logs(path, strategies, events):
    """train.py --logs DIR|HUB_ID (a built-in world): the training dialogues. A dataset of several
    splits gives its "train" split."""
    splits = load(path)
    if len(splits) > 1 and "train" not in splits:
        raise DataError(f"{path}: splits {', '.join(splits)}; --logs reads one split or the 'train' split")
    name = "train" if "train" in splits else next(iter(splits))
    return from_dataset(splits[name], f"{path} split '{name}'", strategies, events)


def record_splits(path):
    """train.py --data records --data-path DIR|HUB_ID: {split: records} with train / dev / test, dev
    from a "validation" or "dev" split (else empty); a dataset of one split returns {"all": records},
    for the caller to split by its seeded rule."""
    splits = load(path)
    if len(splits) == 1:
        (name, ds), = splits.items()
        return {"all": from_dataset(ds, f"{path} split '{name}'")}
    if "train" not in splits or "test" not in splits:
        raise DataError(f"{path}: splits {', '.join(splits)}; expected train and test (and validation), "
                        "or a single split to divide")
    dev = "validation" if "validation" in splits else "dev" if "dev" in splits else None
    return {"train": from_dataset(splits["train"], f"{path} split 'train'"),
            "dev": from_dataset(splits[dev], f"{path} split '{dev}'") if dev else [],
            "test": from_dataset(splits["test"], f"{path} split 'test'")}


# ----------------------------------------------------------------------------- MultiWOZ 2.2, hub layout
def multiwoz_splits(path):
    """train.py --data multiwoz --data-path DIR|HUB_ID for the Hugging Face MultiWOZ 2.2
    (multi_woz_v22: splits train / validation / test, a dialogue per row, its turns a dict of lists):
    {"train", "dev", "test"} records by the rules of corpora.load_multiwoz."""
    from worlds import corpora
    splits = load(path)
    names = {"train": "train", "dev": "validation" if "validation" in splits else "dev", "test": "test"}
    if any(n not in splits for n in names.values()):
        raise DataError(f"{path}: splits {', '.join(splits)}; the Hugging Face MultiWOZ 2.2 has train, "
                        "validation and test")
    out = {}
    for split, name in names.items():
        ds = splits[name]
        if not {"dialogue_id", "services", "turns"} <= set(ds.column_names):
            raise DataError(f"{path} split '{name}': columns {', '.join(ds.column_names)}; expected the Hugging Face "
                            "MultiWOZ 2.2 layout (dialogue_id, services, turns); a dataset in the common record "
                            "schema goes with --data records")
        # speaker is a ClassLabel there (0 = USER, 1 = SYSTEM): the names come with the features
        speaker = ds.features["turns"]["speaker"] if isinstance(ds.features["turns"], dict) else None
        speakers = getattr(getattr(speaker, "feature", speaker), "names", None) or corpora.MULTIWOZ_HUB_SPEAKERS
        out[split] = [corpora.multiwoz_hub_record(row, speakers, f"{path} split '{name}' row {i}")
                      for i, row in enumerate(ds)]
    return out

"""One record schema for every dialogue source, held as a list of dicts, written as JSONL.

Records stay plain lists of dicts in training: a record is a nested, variable-length dialogue whose
scenario keys differ by source, the training loops sample whole dialogues by index, and the largest
corpus here (MultiWOZ, ~10k dialogues) fits in memory many times over, so Arrow tables would speed
up nothing. Hugging Face `datasets` is the exchange format only, because that is how researchers
keep and share dialogue corpora: `--logs` and `--data-path` also read a dataset (a save_to_disk
folder, or a hub id online) and `python -m worlds.export RUN` writes a run's logs as one. It is
converted to records once, in worlds/hf.py, the one module that imports `datasets`, and only on
those paths: the built-in worlds train without it (the GPU image has neither it nor pyarrow, pandas).

A record (docs/design.md):
    {"id": str, "source": str, "scenario": dict,
     "turns": [{"role": "customer"|"agent", "text": str, "strategy": str|None, "event": str|None}],
     "success": bool, "ref_strategies": [str, ...]}

Agent turns carry the strategy that produced them; customer turns carry the engagement event that
the previous agent turn caused (None for the opening line). Every loader returns a list of such
dicts, checked by `validate_record`; bad input raises `DataError` with a one-line message that names
the record and the field, so the CLIs can print it and exit 2.

This module imports no world: the worlds (worlds/) import it. Which world a run uses, and the logs a
real dataset gives it, is worlds.load_world.
"""
import json
import os

RECORD_FIELDS = {"id": str, "source": str, "scenario": dict, "turns": list, "success": bool,
                 "ref_strategies": list}
TURN_FIELDS = ("role", "text", "strategy", "event")


class DataError(ValueError):
    """Bad input data. The message is one line and says what to fix."""


def validate_record(rec, where, strategies=None, events=None):
    """Check one record against the schema; `where` names it in errors (e.g. "train.jsonl line 7")."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for field, typ in RECORD_FIELDS.items():
        if field not in rec:
            raise DataError(f"{where}: missing field '{field}'")
        if not isinstance(rec[field], typ):
            raise DataError(f"{where}: field '{field}' should be {typ.__name__}, "
                            f"got {type(rec[field]).__name__}")
    for i, turn in enumerate(rec["turns"]):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: turns[{i}] should be an object")
        for field in TURN_FIELDS:
            if field not in turn:
                raise DataError(f"{where}: turns[{i}] missing field '{field}'")
        for field in TURN_FIELDS:  # role and text are strings; strategy and event may be null
            if not isinstance(turn[field], str) and (field in ("role", "text") or turn[field] is not None):
                raise DataError(f"{where}: turns[{i}].{field} should be a string"
                                f"{'' if field in ('role', 'text') else ' or null'}, "
                                f"got {type(turn[field]).__name__}")
        if turn["role"] not in ("customer", "agent"):
            raise DataError(f"{where}: turns[{i}].role is '{turn['role']}', "
                            "expected 'customer' or 'agent'")
        if strategies is not None and turn["role"] == "agent" and turn["strategy"] not in strategies:
            raise DataError(f"{where}: turns[{i}] has unknown strategy '{turn['strategy']}' "
                            f"(known: {', '.join(strategies)})")
        if events is not None and turn["role"] == "customer" and turn["event"] is not None \
                and turn["event"] not in events:
            raise DataError(f"{where}: turns[{i}] has unknown event '{turn['event']}' "
                            f"(known: {', '.join(events)})")
    if strategies is not None:
        for z in rec["ref_strategies"]:
            if z not in strategies:
                raise DataError(f"{where}: ref_strategies has unknown strategy '{z}'")
    return rec


def write_jsonl(records, path):
    """Write records one per line, atomically (temp file, then rename)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
    os.replace(tmp, path)


def read_jsonl(path, strategies=None, events=None):
    """Read and validate a UTF-8 JSONL file of records; errors name the line."""
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, not a JSONL file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    records = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path} line {lineno}: not UTF-8 text (byte {e.start}); "
                                    "save the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except (ValueError, RecursionError) as e:  # JSONDecodeError, too many digits, deep nesting
                    why = e.msg if isinstance(e, json.JSONDecodeError) else str(e).splitlines()[0]
                    raise DataError(f"{path} line {lineno}: malformed JSON ({why}); "
                                    "each line must be one JSON record") from None
                records.append(validate_record(rec, f"{path} line {lineno}", strategies, events))
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not records:
        raise DataError(f"{path}: no records in file")
    return records


# ----------------------------------------------------------------------------- built-in world splits
# Train and held-out scenario seeds come from disjoint ranges, so no evaluation scenario is ever
# seen in logs, SFT or GOPO rollouts.
TRAIN_SEED_BASE = 0            # train scenarios: seeds 0 .. 999_999
TEST_SEED_BASE = 1_000_000     # held-out scenarios: seeds 1_000_000 ..


def train_seeds(n, offset=0):
    assert offset + n <= TEST_SEED_BASE, "train seeds would overlap the held-out range"
    return list(range(TRAIN_SEED_BASE + offset, TRAIN_SEED_BASE + offset + n))


def test_seeds(n):
    return list(range(TEST_SEED_BASE, TEST_SEED_BASE + n))

"""Tests of the MG-ShopDial and MultiWOZ 2.2 loaders (worlds/corpora.py)."""
import json
import os
import shutil

import pytest

from data import DataError, validate_record
from worlds.corpora import (load_mgshop, load_multiwoz, majority_intent, mgshop_counts, mgshop_split,
                            multiwoz_success, turn_label)

MGSHOP = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "MGShopDial.json")
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "multiwoz")
needs_mgshop = pytest.mark.skipif(not os.path.isfile(MGSHOP),
                                  reason=f"MG-ShopDial not found at {MGSHOP} (download it from its "
                                         "public repository to run this test)")


def utt(who, text, intents):
    return {"utterance_id": 0, "participant": who, "utterance": text, "goal": "meta", "intents": intents}


def conv(cid, utterances, checklist=("greetings",)):
    return {"id": cid, "metadata": {"type": "simple", "id": "1", "constraint": "low", "desc": "d",
                                    "client_checklist": list(checklist), "wizard_checklist": [],
                                    "search_logs": []},
            "utterances": utterances}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


# ----------------------------------------------------------------------------- MG-ShopDial
def test_majority_intent_highest_score_and_ties():
    assert majority_intent([["greeting", 3.0], ["interaction", 4.0]]) == "interaction"
    assert majority_intent([["elicit", 2.0], ["o_question", 3.0], ["pf", 1]]) == "o_question"
    assert majority_intent([["interaction", 2.0], ["o_question", 2.0]]) == "interaction"  # tie: first
    assert majority_intent([["pf", 1.0], ["answer", 2.0], ["elicit", 2.0]]) == "answer"
    assert majority_intent([["answer", 2]]) == "answer"
    assert majority_intent([]) == "other"


def test_mgshop_merges_consecutive_utterances(tmp_path):
    c = conv("Books:1:2:3", [
        utt("Client", "Hi! ", [["greeting", 3.0]]),
        utt("Client", "I want a book.", [["disclose", 4.0]]),
        utt("Wizard", "Any genre?", [["elicit", 2.0], ["o_question", 2.0]]),
        utt("Wizard", "We have many.", [["explain", 5.0]]),
        utt("Client", "Thrillers.", [["answer", 3.0]]),
        utt("Wizard", "Try this one.", [["recommend", 3.0]]),
        utt("Client", "I'll take it.", []),
    ], checklist=["greetings", "decision"])
    recs = load_mgshop(write_json(tmp_path / "m.json", [c]))
    assert len(recs) == 1
    r = recs[0]
    assert [(t["role"], t["text"], t["strategy"], t["event"]) for t in r["turns"]] == [
        ("customer", "Hi! I want a book.", None, None),          # opening line: no event
        ("agent", "Any genre? We have many.", "elicit", None),   # merged: first utterance's label
        ("customer", "Thrillers.", None, "answer"),
        ("agent", "Try this one.", "recommend", None),
        ("customer", "I'll take it.", None, "other"),
    ]
    assert r["ref_strategies"] == ["elicit", "recommend"]
    assert r["success"] is True and r["source"] == "mgshop" and r["id"] == "Books:1:2:3"
    assert r["scenario"]["category"] == "Books" and r["scenario"]["constraint"] == "low"
    c2 = conv("Books:9", [utt("Wizard", "Hello", [["greeting", 1.0]]),
                          utt("Client", "Hi", [["greeting", 1.0]])])
    r2 = load_mgshop(write_json(tmp_path / "m2.json", [c2]))[0]
    assert r2["success"] is False
    assert r2["turns"][1]["event"] == "greeting"  # a client turn after an agent turn has an event


@needs_mgshop
def test_mgshop_real_file_counts_and_records_validate():
    assert mgshop_counts(MGSHOP) == {"conversations": 64, "utterances": 2196, "categories": 4}
    recs = load_mgshop(MGSHOP)
    assert len(recs) == 64 and len({r["id"] for r in recs}) == 64
    for r in recs:
        validate_record(r, r["id"])
        assert r["ref_strategies"] == [t["strategy"] for t in r["turns"] if t["role"] == "agent"]
        roles = [t["role"] for t in r["turns"]]
        assert all(a != b for a, b in zip(roles, roles[1:])), "same-speaker turns were not merged"
    assert sum(r["success"] for r in recs) == 26  # "decision" in 26 client checklists
    assert {r["scenario"]["category"] for r in recs} == {
        "Books", "Cellphones&Accessories", "Officeproducts", "SportsandOutdoors"}


def test_mgshop_split_sizes_disjoint_deterministic():
    recs = [{"id": f"Books:{i}"} for i in range(64)]
    s = mgshop_split(recs, seed=0)
    assert {k: len(v) for k, v in s.items()} == {"train": 48, "dev": 8, "test": 8}
    ids = {k: {r["id"] for r in v} for k, v in s.items()}
    assert ids["train"] | ids["dev"] | ids["test"] == {r["id"] for r in recs}
    assert not (ids["train"] & ids["dev"]) and not (ids["train"] & ids["test"]) \
        and not (ids["dev"] & ids["test"])
    assert mgshop_split(list(reversed(recs)), seed=0) == s  # input order does not matter
    assert mgshop_split(recs, seed=1)["test"] != s["test"]


def test_mgshop_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_mgshop(str(tmp_path / "absent.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"id\": ")
    with pytest.raises(DataError, match=r"bad\.json: malformed JSON"):
        load_mgshop(str(bad))
    with pytest.raises(DataError, match="expected a JSON list"):
        load_mgshop(write_json(tmp_path / "d.json", {"id": "x"}))
    no_utts = conv("Books:7", [])
    del no_utts["utterances"]
    with pytest.raises(DataError, match=r"conversation 0 \('Books:7'\): missing field 'utterances'"):
        load_mgshop(write_json(tmp_path / "u.json", [no_utts]))
    no_part = conv("Books:8", [utt("Wizard", "Hello", [])])
    del no_part["utterances"][0]["participant"]
    with pytest.raises(DataError, match=r"'Books:8'\) utterance 0: missing field 'participant'"):
        load_mgshop(write_json(tmp_path / "p.json", [conv("Books:1", [utt("Client", "a", [])]),
                                                     no_part]))
    no_check = conv("Books:9", [utt("Wizard", "Hello", [])])
    del no_check["metadata"]["client_checklist"]
    with pytest.raises(DataError, match="metadata: missing field 'client_checklist'"):
        load_mgshop(write_json(tmp_path / "c.json", [no_check]))


# ----------------------------------------------------------------------------- MultiWOZ 2.2
def by_id(splits):
    return {r["id"]: r for recs in splits.values() for r in recs}


def test_turn_label_strips_domain_and_uses_priority():
    assert turn_label({"Restaurant-Inform": [["food", "thai"]]}) == "Inform"
    assert turn_label({"general-bye": [["none", "none"]]}) == "bye"
    assert turn_label({"Restaurant-Inform": [["choice", "3"]], "Restaurant-Request": [["area", "?"]]}) \
        == "Request"
    assert turn_label({"general-reqmore": [], "Booking-Book": [["ref", "X"]]}) == "Book"
    assert turn_label({"Hotel-Zeta": [], "Hotel-Alpha": []}) == "Alpha"  # unlisted: alphabetical
    assert turn_label({"general-bye": [], "Hotel-Alpha": []}) == "bye"   # listed beats unlisted
    assert turn_label({}) == "none"


def test_multiwoz_fixture_loads_and_validates():
    splits = load_multiwoz(FIXTURE)
    assert {k: [r["id"] for r in v] for k, v in splits.items()} == {
        "train": ["SNG0001.json", "PMUL0002.json", "SNG0003.json"],
        "dev": ["MUL0004.json"], "test": ["SNG0005.json"]}
    for r in by_id(splits).values():
        validate_record(r, r["id"])
        assert r["source"] == "multiwoz"
        assert r["ref_strategies"] == [t["strategy"] for t in r["turns"] if t["role"] == "agent"]
        assert all("-" not in t["strategy"] for t in r["turns"] if t["role"] == "agent")
    r = by_id(splits)["SNG0001.json"]
    assert r["scenario"] == {"services": ["restaurant"]}
    assert r["ref_strategies"] == ["Recommend", "Book", "welcome"]
    assert [t["event"] for t in r["turns"] if t["role"] == "customer"] == [None, "Request", "thank"]
    assert r["turns"][0]["text"].startswith("I'm looking for a cheap italian")
    assert by_id(splits)["MUL0004.json"]["ref_strategies"] == ["Request", "OfferBooked", "welcome"]


def test_multiwoz_success_proxy_on_fixture():
    success = {i: r["success"] for i, r in by_id(load_multiwoz(FIXTURE)).items()}
    assert success == {
        "SNG0001.json": True,    # phone informed after the request, table booked
        "PMUL0002.json": False,  # postcode never informed, booking failed (NoBook)
        "SNG0003.json": True,    # fee and address informed, no booking wanted
        "MUL0004.json": True,    # train booked (OfferBooked)
        "SNG0005.json": False,   # address informed only BEFORE the user asked for it
    }


def test_multiwoz_success_booking_rules():
    user = {"speaker": "USER", "frames": [{"service": "taxi", "state": {
        "active_intent": "book_taxi", "requested_slots": [], "slot_values": {}}}]}
    system = {"speaker": "SYSTEM", "frames": []}
    assert multiwoz_success([user, system], [{}, {"Taxi-Inform": [["car", "blue honda"]]}]) is True
    assert multiwoz_success([user, system], [{}, {"Taxi-Request": [["leaveat", "?"]]}]) is False
    assert multiwoz_success([user, system], [{}, {"Booking-Book": [["ref", "X"]]}]) is True


def test_multiwoz_accepts_both_act_keys(tmp_path):
    """SNG0003 in the fixture uses "dialogue_acts", the others "dialog_act"; swapping all entries
    to either key must give the same records."""
    assert by_id(load_multiwoz(FIXTURE))["SNG0003.json"]["ref_strategies"] == \
        ["Recommend", "Inform", "none"]
    want = load_multiwoz(FIXTURE)
    for key in ("dialog_act", "dialogue_acts"):
        folder = tmp_path / key
        shutil.copytree(FIXTURE, folder)
        with open(folder / "dialog_acts.json") as f:
            acts = json.load(f)
        for turns in acts.values():
            for tid, entry in turns.items():
                a = entry.get("dialog_act", entry.get("dialogue_acts"))
                turns[tid] = {key: a, "span_info": []}
        write_json(folder / "dialog_acts.json", acts)
        assert load_multiwoz(str(folder)) == want


def test_multiwoz_errors(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        load_multiwoz(str(tmp_path / "absent"))
    folder = tmp_path / "mw"
    shutil.copytree(FIXTURE, folder)
    os.remove(folder / "dialog_acts.json")
    with pytest.raises(DataError, match=r"dialog_acts\.json: no such file"):
        load_multiwoz(str(folder))
    shutil.copy(os.path.join(FIXTURE, "dialog_acts.json"), folder / "dialog_acts.json")
    shutil.rmtree(folder / "dev")
    with pytest.raises(DataError, match="split 'dev'"):
        load_multiwoz(str(folder))
    shutil.copytree(os.path.join(FIXTURE, "dev"), folder / "dev")
    path = folder / "test" / "dialogues_001.json"
    path.write_text("[{\"dialogue_id\": \"X\",")
    with pytest.raises(DataError, match=r"test[/\\]dialogues_001\.json: malformed JSON"):
        load_multiwoz(str(folder))
    with open(os.path.join(FIXTURE, "test", "dialogues_001.json")) as f:
        dialogues = json.load(f)
    del dialogues[0]["turns"]
    write_json(path, dialogues)
    with pytest.raises(DataError, match=r"dialogue 0 \('SNG0005\.json'\): missing field 'turns'"):
        load_multiwoz(str(folder))
    with open(os.path.join(FIXTURE, "test", "dialogues_001.json")) as f:
        dialogues = json.load(f)
    del dialogues[0]["turns"][2]["speaker"]
    write_json(path, dialogues)
    with pytest.raises(DataError, match=r"turn 2: missing field 'speaker'"):
        load_multiwoz(str(folder))

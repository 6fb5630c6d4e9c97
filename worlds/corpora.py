"""Loaders of two real dialogue corpora into the common record schema of data.py (docs/design.md).

MG-ShopDial (SIGIR 2023): one JSON list of e-commerce conversations between a "Wizard" (the shop
assistant) and a "Client", every utterance annotated with scored intents.
MultiWOZ 2.2: the official folder, `{train,dev,test}/dialogues_*.json` plus `dialog_acts.json`; or
the rows of its Hugging Face copy (multi_woz_v22), which worlds/hf.py reads.

Every rule below is a documented choice of ours (the corpora do not define strategies or events).
Each loader returns records that pass `data.validate_record`; bad input raises `DataError` with a
one-line message naming the file, the record and the field.
"""
import glob
import json
import os
import random

from data import DataError, validate_record


def _read_json(path):
    """Read one JSON file; a missing file or malformed JSON is a `DataError` naming the file."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None


def _field(obj, field, where):
    """obj[field], or a `DataError` naming the record and the missing field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if field not in obj:
        raise DataError(f"{where}: missing field '{field}'")
    return obj[field]


# ----------------------------------------------------------------------------- MG-ShopDial
MGSHOP_ROLES = {"Wizard": "agent", "Client": "customer"}
NO_INTENT = "other"  # label of an utterance annotated with no intent at all (39 in the corpus)


def majority_intent(intents):
    """The label of one utterance: the intent with the highest score.

    `intents` is a list of [name, score] pairs, e.g. [["greeting", 3.0], ["interaction", 4.0]].
    Ties: the first listed among the tied wins. An empty list gives "other" (an existing
    MG-ShopDial intent), so every agent turn has a strategy.
    """
    best_name, best_score = NO_INTENT, None
    for name, score in intents:
        if best_score is None or score > best_score:  # strict '>': the earlier of tied intents stays
            best_name, best_score = name, score
    return best_name


def _mgshop_raw(path):
    """Read and check the raw file: a list of conversations with "id", "metadata", "utterances"."""
    convs = _read_json(path)
    if not isinstance(convs, list):
        raise DataError(f"{path}: expected a JSON list of conversations, got {type(convs).__name__}")
    for i, conv in enumerate(convs):
        where = f"{path} conversation {i}"
        cid = _field(conv, "id", where)
        if not isinstance(cid, str):
            raise DataError(f"{where}: field 'id' should be a string")
        where = f"{path} conversation {i} ('{cid}')"
        _field(_field(conv, "metadata", where), "client_checklist", f"{where} metadata")
        utts = _field(conv, "utterances", where)
        if not isinstance(utts, list) or not utts:
            raise DataError(f"{where}: field 'utterances' should be a non-empty list")
        for j, u in enumerate(utts):
            uwhere = f"{where} utterance {j}"
            for field in ("participant", "utterance", "intents"):
                _field(u, field, uwhere)
            if not isinstance(u["utterance"], str):
                raise DataError(f"{uwhere}: field 'utterance' should be a string")
            if u["participant"] not in MGSHOP_ROLES:
                raise DataError(f"{uwhere}: field 'participant' is '{u['participant']}', "
                                "expected 'Wizard' or 'Client'")
            if not isinstance(u["intents"], list) or \
                    not all(isinstance(p, list) and len(p) == 2 for p in u["intents"]):
                raise DataError(f"{uwhere}: field 'intents' should be a list of [name, score] pairs")
    return convs


def load_mgshop(path):
    """MG-ShopDial JSON -> records. The rules:

    - roles: Wizard -> "agent", Client -> "customer"; utterances are taken in file order.
    - consecutive utterances of one speaker are merged into one turn: texts stripped and joined
      with one space; the merged turn keeps the FIRST utterance's label.
    - an utterance's label is `majority_intent` of its intents (ties: first listed; none: "other").
    - agent turn: strategy = its label, event None. Customer turn: event = its label, strategy None;
      a customer turn before any agent turn (the opening line) has event None.
    - success = "decision" in metadata["client_checklist"].
    - ref_strategies = the agent turns' strategies, in order (the human strategy sequence).
    - id = the conversation id (e.g. "Books:45:109:118"); source = "mgshop";
      scenario = {"category": id prefix before the first ':', "desc", "type", "constraint"}.
    """
    records = []
    for i, conv in enumerate(_mgshop_raw(path)):
        turns = []
        for u in conv["utterances"]:
            role, text = MGSHOP_ROLES[u["participant"]], u["utterance"].strip()
            if turns and turns[-1]["role"] == role:
                turns[-1]["text"] = f"{turns[-1]['text']} {text}".strip()
                continue
            label = majority_intent(u["intents"])
            seen_agent = any(t["role"] == "agent" for t in turns)
            turns.append({"role": role, "text": text,
                          "strategy": label if role == "agent" else None,
                          "event": label if role == "customer" and seen_agent else None})
        meta = conv["metadata"]
        rec = {"id": conv["id"], "source": "mgshop",
               "scenario": {"category": conv["id"].split(":")[0], "desc": meta.get("desc", ""),
                            "type": meta.get("type", ""), "constraint": meta.get("constraint", "")},
               "turns": turns,
               "success": "decision" in meta["client_checklist"],
               "ref_strategies": [t["strategy"] for t in turns if t["role"] == "agent"]}
        records.append(validate_record(rec, f"{path} conversation {i} ('{conv['id']}')"))
    return records


def mgshop_counts(path):
    """Raw counts of the file, before merging: {"conversations", "utterances", "categories"}.
    The data card says 64 / 2,196 / 4 (categories = distinct id prefixes before ':')."""
    convs = _mgshop_raw(path)
    return {"conversations": len(convs),
            "utterances": sum(len(c["utterances"]) for c in convs),
            "categories": len({c["id"].split(":")[0] for c in convs})}


def mgshop_split(records, seed=0):
    """Seeded split by dialogue: records sorted by id, shuffled with random.Random(seed); the first
    round(n/8) go to test, the next round(n/8) to dev, the rest to train (48/8/8 for n = 64)."""
    recs = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(recs)
    k = round(len(recs) / 8)
    return {"train": recs[2 * k:], "dev": recs[k:2 * k], "test": recs[:k]}


# ----------------------------------------------------------------------------- MultiWOZ 2.2
MULTIWOZ_SPLITS = ("train", "dev", "test")
MULTIWOZ_ROLES = {"USER": "customer", "SYSTEM": "agent"}
# One act type stands for a whole turn: the first of its types in this list (most decisive first).
# Types not listed come after all listed ones, alphabetically. A turn without acts is "none".
# Request ranks above Inform: "There are 9 places (Inform). Which area? (Request)" is a question.
ACT_PRIORITY = ("Book", "OfferBooked", "NoBook", "NoOffer", "OfferBook", "Recommend", "Select",
                "Request", "Inform", "reqmore", "greet", "welcome", "thank", "bye")
INFORMING_ACTS = {"Inform", "Recommend", "Select", "OfferBook", "OfferBooked", "Book"}
BOOKING_ACTS = {"Book", "OfferBooked"}


def act_type(act_name):
    """Strip the domain: "Restaurant-Inform" -> "Inform", "general-bye" -> "bye"."""
    return act_name.split("-", 1)[-1]


def turn_label(acts):
    """One label for a turn's acts {act_name: [[slot, value], ...]}: domains stripped, then the
    highest in ACT_PRIORITY (unlisted types after listed ones, alphabetically); no acts -> "none"."""
    types = {act_type(name) for name in acts}
    if not types:
        return "none"
    rank = {t: i for i, t in enumerate(ACT_PRIORITY)}
    return min(types, key=lambda t: (rank.get(t, len(ACT_PRIORITY)), t))


def multiwoz_success(turns, acts):
    """Our success proxy for one dialogue; simpler than the official MultiWOZ Inform/Success.

    `turns` are the dialogue's raw turns, `acts[i]` the act dict of turns[i]. Success iff both:
    - every slot the user requested (state.requested_slots of the user turns' frames, e.g.
      "restaurant-phone" in service "restaurant") is informed by a system turn AFTER the user turn
      that first requested it: an act of type Inform, Recommend, Select, OfferBook, OfferBooked or
      Book, whose domain is that service or "Booking", carrying that slot (names compared
      lowercase, service prefix removed: "restaurant-phone" -> "phone");
    - if any user frame has an active_intent starting with "book", some system turn has a Book or
      OfferBooked act (any domain), or a Taxi-Inform with slot "car" (how taxi bookings are
      confirmed in MultiWOZ).
    A dialogue with no requests and no booking intent is a success.
    """
    first_request, wants_booking = {}, False
    for i, turn in enumerate(turns):
        if turn["speaker"] != "USER":
            continue
        for frame in turn.get("frames", []):
            service, state = frame.get("service", ""), frame.get("state", {})
            wants_booking |= state.get("active_intent", "").startswith("book")
            for slot in state.get("requested_slots", []):
                slot = slot.lower().removeprefix(f"{service.lower()}-")
                first_request.setdefault((service.lower(), slot), i)
    informed, booked = {}, False  # informed[(domain, slot)] = turn indices where it was informed
    for i, turn in enumerate(turns):
        if turn["speaker"] != "SYSTEM":
            continue
        for name, pairs in acts[i].items():
            domain, typ = name.split("-", 1)[0].lower(), act_type(name)
            slots = {str(p[0]).lower() for p in pairs}
            booked |= typ in BOOKING_ACTS or (name.lower() == "taxi-inform" and "car" in slots)
            if typ in INFORMING_ACTS:
                for slot in slots:
                    informed.setdefault((domain, slot), []).append(i)
    for (service, slot), t in first_request.items():
        later = informed.get((service, slot), []) + informed.get(("booking", slot), [])
        if not any(s > t for s in later):
            return False
    return booked or not wants_booking


def _turn_acts(all_acts, dialogue_id, turn_id, where):
    """The act dict of one turn from dialog_acts.json. Acts sit under "dialog_act" (released file)
    or "dialogue_acts" (README example); both are accepted. A turn with no entry has no acts."""
    by_turn = all_acts.get(dialogue_id, {})
    entry = by_turn.get(str(turn_id), {}) if isinstance(by_turn, dict) else None
    acts = entry.get("dialog_act", entry.get("dialogue_acts", {})) if isinstance(entry, dict) else None
    if not isinstance(acts, dict):
        raise DataError(f"{where}: dialog_acts.json entry should be an object of act name -> pairs")
    for name, pairs in acts.items():
        if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise DataError(f"{where}: act '{name}' in dialog_acts.json should be a list of "
                            "[slot, value] pairs")
    return acts


def _multiwoz_record(dlg, all_acts, where):
    """One raw MultiWOZ 2.2 dialogue -> record (rules in `load_multiwoz`)."""
    did = _field(dlg, "dialogue_id", where)
    where = f"{where} ('{did}')"
    services = _field(dlg, "services", where)
    raw_turns = _field(dlg, "turns", where)
    if not isinstance(raw_turns, list) or not raw_turns:
        raise DataError(f"{where}: field 'turns' should be a non-empty list")
    turns, acts = [], []
    for j, t in enumerate(raw_turns):
        twhere = f"{where} turn {j}"
        for field in ("turn_id", "speaker", "utterance"):
            _field(t, field, twhere)
        if t["speaker"] not in MULTIWOZ_ROLES:
            raise DataError(f"{twhere}: field 'speaker' is '{t['speaker']}', expected USER or SYSTEM")
        if not isinstance(t["utterance"], str):
            raise DataError(f"{twhere}: field 'utterance' should be a string")
        acts.append(_turn_acts(all_acts, did, t["turn_id"], twhere))
        role, label = MULTIWOZ_ROLES[t["speaker"]], turn_label(acts[-1])
        seen_agent = any(x["role"] == "agent" for x in turns)
        turns.append({"role": role, "text": t["utterance"].strip(),
                      "strategy": label if role == "agent" else None,
                      "event": label if role == "customer" and seen_agent else None})
    rec = {"id": did, "source": "multiwoz", "scenario": {"services": list(services)},
           "turns": turns, "success": multiwoz_success(raw_turns, acts),
           "ref_strategies": [x["strategy"] for x in turns if x["role"] == "agent"]}
    return validate_record(rec, where)


MULTIWOZ_HUB_SPEAKERS = ("USER", "SYSTEM")   # the hub's ClassLabel names, in the order of its ids


def _as_rows(value, where):
    """Hugging Face stores a sequence of objects as one object of equal-length lists
    ({"a": [1, 2], "b": [3, 4]}); this gives back the list of objects ([{"a": 1, "b": 3}, ...]).
    A list is returned as it is."""
    if isinstance(value, list):
        return value
    if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()) \
            or len({len(v) for v in value.values()}) > 1:
        raise DataError(f"{where}: expected a list of objects, or an object of equal-length lists")
    return [dict(zip(value, items)) for items in zip(*value.values())]


def multiwoz_hub_record(row, speakers, where):
    """One row of the Hugging Face MultiWOZ 2.2 (multi_woz_v22) -> record, by the rules of `load_multiwoz`.

    The hub's builder made each row from the GitHub files: the dialogue's turns, each turn's frames
    and its dialog_acts.json entry under "dialogue_acts" ("dialog_act": act type -> slots as
    "slot_name" / "slot_value" lists), sequences of objects stored as objects of lists, and the
    speaker as a class id (`speakers` names them). This undoes that and reuses the GitHub path, so
    both give the same record. One difference is the hub's, not ours: its default config
    (v2.2_active_only) drops the frames whose active intent is NONE, and with them their requested
    slots, so `multiwoz_success` may differ there; config v2.2 keeps every frame.
    """
    did = _field(row, "dialogue_id", where)
    turns, acts = [], {}
    for j, t in enumerate(_as_rows(_field(row, "turns", f"{where} ('{did}')"), f"{where} ('{did}') turns")):
        twhere = f"{where} ('{did}') turn {j}"
        turn_id = str(_field(t, "turn_id", twhere))
        speaker = t.get("speaker")
        if isinstance(speaker, int) and 0 <= speaker < len(speakers):
            speaker = speakers[speaker]
        frames = []
        for f in _as_rows(t.get("frames") or [], f"{twhere} frames"):
            frames.append({"service": _field(f, "service", f"{twhere} frame"), "state": f.get("state") or {}})
        pairs_of = {}   # act type -> [[slot, value], ...], as in dialog_acts.json
        for a in _as_rows((t.get("dialogue_acts") or {}).get("dialog_act") or [], f"{twhere} dialogue_acts"):
            awhere = f"{twhere} dialogue_acts"
            pairs_of[_field(a, "act_type", awhere)] = [[_field(s, "slot_name", awhere), _field(s, "slot_value", awhere)]
                                                       for s in _as_rows(a.get("act_slots") or [], awhere)]
        acts[turn_id] = {"dialog_act": pairs_of}
        turns.append({**t, "turn_id": turn_id, "speaker": speaker, "frames": frames})
    dialogue = {"dialogue_id": did, "services": _field(row, "services", f"{where} ('{did}')"), "turns": turns}
    return _multiwoz_record(dialogue, {did: acts}, where)


def load_multiwoz(folder):
    """Official MultiWOZ 2.2 folder -> {"train": [...], "dev": [...], "test": [...]}. The rules:

    - files: `<folder>/dialog_acts.json` and, per split, `<folder>/<split>/dialogues_*.json`
      (read in sorted name order; each a JSON list of dialogues). A split without such files is an
      error.
    - roles: USER -> "customer", SYSTEM -> "agent"; turns kept one to one, in file order.
      Required fields: dialogue "dialogue_id", "services", "turns"; turn "turn_id", "speaker",
      "utterance" ("frames" is optional; without it a user turn requests and books nothing).
    - a turn's acts come from dialog_acts.json[dialogue_id][turn_id] (see `_turn_acts`); its label
      is `turn_label`: act types with the domain stripped, one chosen by ACT_PRIORITY, "none" if
      the turn has no acts.
    - agent turn: strategy = its label. Customer turn after an agent turn: event = its label; the
      opening customer turn has event None.
    - success = `multiwoz_success` (a proxy, simpler than the official Inform/Success).
    - ref_strategies = the system strategy sequence; id = dialogue_id (e.g. "PMUL4398.json");
      source = "multiwoz"; scenario = {"services": the dialogue's "services"}.
    """
    if not os.path.isdir(folder):
        raise DataError(f"{folder}: no such folder (expected the MultiWOZ 2.2 data folder)")
    acts_path = os.path.join(folder, "dialog_acts.json")
    all_acts = _read_json(acts_path)
    if not isinstance(all_acts, dict):
        raise DataError(f"{acts_path}: expected a JSON object keyed by dialogue id")
    out = {}
    for split in MULTIWOZ_SPLITS:
        split_dir = os.path.join(folder, split)
        if not os.path.isdir(split_dir):
            raise DataError(f"{split_dir}: no such folder (MultiWOZ split '{split}')")
        paths = sorted(glob.glob(os.path.join(split_dir, "dialogues_*.json")))
        if not paths:
            raise DataError(f"{split_dir}: no dialogues_*.json files")
        out[split] = []
        for path in paths:
            dialogues = _read_json(path)
            if not isinstance(dialogues, list):
                raise DataError(f"{path}: expected a JSON list of dialogues")
            for i, dlg in enumerate(dialogues):
                out[split].append(_multiwoz_record(dlg, all_acts, f"{path} dialogue {i}"))
    return out

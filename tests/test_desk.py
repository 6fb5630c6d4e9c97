"""The service-desk world (worlds/desk/): the properties that make strategy a planning problem there.

Measured on held-out scenarios (data.test_seeds), so the myopic table, fitted on training seeds,
is judged out of sample. One module-scoped run of every rule policy serves most tests.
"""
import random
import re
import string
from collections import Counter

import pytest

import data
from worlds import desk, shop

N = 600
SCENARIOS = [desk.make_scenario(s) for s in data.test_seeds(N)]


@pytest.fixture(scope="module")
def runs():
    return {name: [desk.play(sc, policy) for sc in SCENARIOS] for name, policy in desk.POLICIES.items()}


def rate(recs, key="success"):
    return sum(float(r[key]) for r in recs) / len(recs)


def agent_turns(rec):
    return [t for t in rec["turns"] if t["role"] == "agent"]


# ----------------------------------------------------------------------------- contract
def test_contract_names_and_record_schema(runs):
    for name in desk.CONTRACT + ["make_world", "fit_myopic", "last_line_share"]:
        assert hasattr(desk, name), name
    assert set(desk.INSTRUCTIONS) == set(desk.STRATEGIES)
    assert all(len(line) <= 40 for line in desk.INSTRUCTIONS.values())
    assert "leave" in desk.EVENTS and set(desk.SUCCESS_EVENTS) <= set(desk.EVENTS)
    assert set(desk.POLICIES) == {"oracle", "disclosed", "behaviour", "random", "myopic"}
    assert desk.allowed([]) == ["greet"] and desk.allowed(["greet", "close"]) == []
    for recs in runs.values():
        for rec in recs[:50]:
            data.validate_record(rec, rec["id"], desk.STRATEGIES, desk.EVENTS)
            assert set(rec) == {"id", "source", "scenario", "turns", "success", "ref_strategies",
                                "order_value", "sop_ok"}
            roles = [t["role"] for t in rec["turns"]]
            assert roles == ["customer", "agent"] * (len(roles) // 2) + ["customer"]


# ----------------------------------------------------------------------------- measured properties
def test_oracle_reaches_goals_in_long_dialogues(runs):
    oracle = runs["oracle"]
    assert rate(oracle) >= 0.95
    assert sum(len(agent_turns(r)) for r in oracle) / N >= 10
    assert all(r["ref_strategies"] == [t["strategy"] for t in agent_turns(r)] for r in oracle)
    # a tiny CS Agent writes at most 32 tokens a reply, and the dialogue must fit 1,024 tokens
    assert max(len(t["text"]) for r in oracle for t in agent_turns(r)) <= 110
    assert max(sum(len(t["text"]) for t in r["turns"]) for r in oracle) <= 2500


def test_oracle_is_deterministic_given_the_dialogue_so_far():
    for sc in SCENARIOS[:100]:
        turns, _ = desk.dialogue(sc, desk.oracle_policy, seed=0)
        other, _ = desk.dialogue(sc, desk.oracle_policy, seed=7)   # other wording, same decisions
        assert [t["strategy"] for t in turns] == [t["strategy"] for t in other]
        tr = desk.Tracker()
        tr.update(None, turns[0]["text"], "disclose")
        for i in range(1, len(turns), 2):
            picks = {desk.oracle_policy(tr, sc, random.Random(k)) for k in range(3)}
            assert picks == {turns[i]["strategy"]}
            tr.update(turns[i]["strategy"], turns[i + 1]["text"], turns[i + 1]["event"])


def test_rule_policies_leave_a_gap_to_the_oracle(runs):
    oracle = rate(runs["oracle"])
    assert rate(runs["behaviour"]) <= 0.5
    assert rate(runs["random"]) <= 0.05
    assert rate(runs["myopic"]) <= 0.7 * oracle
    assert all(r["sop_ok"] for recs in runs.values() for r in recs)   # rule policies keep the SOP


def test_the_last_line_does_not_decide_the_oracle(runs):
    assert desk.last_line_share(runs["oracle"]) <= 0.75
    shop_oracle = [shop.play(shop.make_scenario(s), shop.oracle_policy) for s in data.test_seeds(N)]
    assert desk.last_line_share(shop_oracle) == 1.0     # in the shop, the last line decides everything


def test_the_world_is_deterministic():
    for sc in SCENARIOS[:60]:
        for policy in (desk.behaviour_policy, desk.random_policy, desk.oracle_policy):
            assert desk.play(sc, policy, seed=3) == desk.play(sc, policy, seed=3)
        assert desk.make_scenario(sc["seed"]) == sc


# ----------------------------------------------------------------------------- wording
def _fields(template):
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def fillings(key):
    """Every paraphrase of `key`, filled with every slot value the world can produce."""
    z = key.split("/")[0]
    for template in desk.PARAPHRASE_BANK[key]:
        for phrase in ([desk.ACTIONS[a][z == "execute"] for a in desk.ACTIONS] if z in ("confirm", "execute") else [""]):
            fields = _fields(template) | _fields(phrase)
            for product in desk.PRODUCTS if fields & {"product", "sold", "thing"} else [None]:
                for order in desk.ORDERS if fields & {"order", "amount", "thing"} else [None]:
                    for fact in desk.FACTS.values() if "fact" in fields else [None]:
                        for thing in [f"the {product}", f"order #{order}"] if "thing" in fields else [None]:
                            slots = {"product": product, "sold": product and desk.other_model(product),
                                     "order": order, "amount": order and desk.ORDERS[order][1],
                                     "fact": fact, "thing": thing}
                            slots["action"] = phrase.format(**slots)
                            yield template, template.format(**slots)


def test_every_paraphrase_is_recognised_as_its_strategy():
    per_strategy, n = Counter(), 0
    for key, bank in desk.PARAPHRASE_BANK.items():
        z = key.split("/")[0]
        per_strategy[z] = max(per_strategy[z], len(set(bank)))
        cue, late = dict(desk._CUES)[z], {}
        for template, text in fillings(key):
            n += 1
            assert desk.recognise(text) == z, (key, text)
            assert len(text) <= 110, text
            late.setdefault(template, cue.search(text.lower()).start() > 0)
        assert sum(late.values()) >= 0.75 * len(bank), key      # the cue is mostly not the first word
    assert set(per_strategy) == set(desk.STRATEGIES) and min(per_strategy.values()) >= 20
    assert n > 10_000


def test_wrong_slot_values_do_not_work():
    sc = next(s for s in SCENARIOS if s["requests"][0]["kind"] == "return" and not s["requests"][0]["order_told"])
    order = sc["requests"][0]["order"]
    wrong = next(o for o in desk.ORDERS if o != order)
    c = desk.Customer(sc)
    c.opening()
    amount = desk.ORDERS[order][1]
    for text in ["Hello, welcome to the help desk, I'm glad to help.", "Could you give me the order number?",
                 "First I need to verify your account. Your email and postcode?"]:
        c.reply(text, 0)
    assert c.reply(f"Under our policy, order #{wrong} has a 30-day window (60 for Gold).", 3)[0] == \
        "Which order do you mean?"
    _, event, _ = c.reply(f"Under our policy, order #{order} has a 30-day window (60 for Gold).", 4)
    assert event == "positive"
    c.st["answered"] = True     # whatever the concern, take it as answered
    for text in [f"So, do you want me to refund ${amount + 1} for order #{order}?",
                 f"So, do you want me to refund ${amount} for order #{wrong}?"]:
        assert c.reply(text, 5)[1] in ("negative", "leave")


# ----------------------------------------------------------------------------- gates
def breaks_gate(history, z):
    """desk.SOP's hard rules, written out rule by rule (independently of desk.allowed)."""
    if not history:
        return z != "greet"                                        # 1. greet first
    starts = [i for i, x in enumerate(history) if x in ("greet", "anything_else")]
    request = history[starts[-1] + 1:] if starts else history
    verified = "verify" in history
    return any([
        history[-1] == "close", z == "greet",                      # 1. nothing after goodbye, greet once
        z == "verify" and verified,                                # 2. verify once
        z in ("state_policy", "apologise", "compensate") and not verified,     # 2. identity first
        z == "offer_alternative" and "ask_order" in request and not verified,
        z == "confirm" and "state_policy" not in request
        and not ("recommend" in request and "ask_order" not in request),       # 3. terms first
        z == "execute" and history[-1] != "confirm",                           # 4. consent
        bool({"execute", "compensate"} & set(request)) and z not in ("anything_else", "close"),
        z == "compensate" and "apologise" not in request,                      # 5. apology first
    ])


def test_allowed_lists_exactly_the_strategies_that_keep_every_gate(runs):
    histories = {()}
    rng = random.Random(0)
    for recs in (runs["random"], runs["behaviour"]):
        for rec in recs:
            zs = [t["strategy"] for t in agent_turns(rec)]
            histories |= {tuple(zs[:k]) for k in range(len(zs) + 1)}
    for _ in range(3000):       # and arbitrary histories, gate-breaking ones included
        histories.add(tuple(rng.choice(desk.STRATEGIES) for _ in range(rng.randrange(1, 12))))
    for h in histories:
        assert desk.allowed(list(h)) == [z for z in desk.STRATEGIES if not breaks_gate(list(h), z)], h


def test_a_gate_breaking_reply_fails_the_dialogue():
    # an eligible one-request return: the oracle succeeds; the same dialogue with one reply that
    # *reads* as execute before any confirmation (whatever was intended) is void, though it goes on
    sc = next(s for s in SCENARIOS if len(s["requests"]) == 1 and s["requests"][0]["kind"] == "return"
              and desk.eligible(s["requests"][0], s["tier"]))
    turns, cust = desk.dialogue(sc, desk.oracle_policy)
    assert cust.success and cust.sop_ok and cust.order_value() > 0
    order = sc["requests"][0]["order"]
    c = desk.Customer(dict(sc, patience=sc["patience"] + 10))   # patient enough to see it through
    c.opening()
    agent = [t["text"] for t in turns if t["role"] == "agent"]
    sneaky = f"Okay, it's done now, I've refunded ${desk.ORDERS[order][1]} for order #{order}."
    events = [c.reply(text, t)[1] for t, text in enumerate(agent[:2] + [sneaky] + agent[2:])]
    assert events[2] == "negative" and "resolved" in events[3:] and events[-1] == "leave"
    assert (c.success, c.sop_ok, c.order_value(), c.gate_breaks) == (False, False, 0.0, [2])
    rec = desk.record(sc, turns, c, "test")
    assert rec["sop_ok"] is False and rec["success"] is False and rec["order_value"] == 0.0


# ----------------------------------------------------------------------------- hidden facts
CONCERNS = [desk.SAY[c][0].strip() for c in desk.FACTS]


def test_hidden_facts_are_disclosed_once_and_only_as_specified(runs):
    kinds = Counter()
    for recs in runs.values():
        for rec in recs:
            seen, prev, req = Counter(), None, -1
            for i, t in enumerate(rec["turns"]):
                if t["role"] == "agent":
                    prev = t["strategy"]
                    continue
                text = t["text"]
                statement = i == 0 or (prev == "anything_else" and t["event"] == "disclose")
                req += statement
                if "member" in text:                                   # tier: only when asked
                    assert prev == "verify", text
                    seen["tier"] += 1
                for order in re.findall(r"#(\d{4})", text):            # order: asked, or in the request
                    assert prev == "ask_order" or statement, text
                    seen[order] += 1
                if re.search(r"budget is \$|Up to \$", text):          # budget: asked, or in the request
                    assert prev == "ask_need" or statement, text
                    seen[("budget", req)] += 1
                for fact in ["days ago"] + CONCERNS:                   # only in the request, unasked
                    if fact in text:
                        assert statement, text
                        seen[(fact, req)] += 1
            assert all(n == 1 for n in seen.values()), (rec["id"], seen)
            kinds.update(k[0] if isinstance(k, tuple) else "order" if k.isdigit() else k for k in seen)
    assert set(kinds) == {"tier", "order", "budget", "days ago", *CONCERNS}, kinds


def test_facts_decide_steps_after_the_words_that_carried_them(runs):
    # the oracle's eligibility and voucher decisions come when the last line names neither tier nor days
    n = 0
    for rec in runs["oracle"]:
        turns = rec["turns"]
        for i, t in enumerate(turns):
            if t["role"] == "agent" and t["strategy"] in ("offer_alternative", "compensate", "confirm"):
                assert "member" not in turns[i - 1]["text"] and "days ago" not in turns[i - 1]["text"]
                n += 1
    assert n > N


# ----------------------------------------------------------------------------- patience
def test_every_question_costs_patience_and_repeats_lose_the_customer():
    sc = next(s for s in SCENARIOS if s["requests"][0]["kind"] == "buy" and not s["requests"][0]["budget_told"])
    c = desk.Customer(sc)
    c.opening()
    c.reply("Hi, welcome to the help desk, I'm glad to help.", 0)
    start = c.patience
    assert c.reply("To narrow it down, what's the budget?", 1)[1] == "disclose" and c.patience == start - 1
    events = [c.reply("To narrow it down, what's the budget?", t)[1] for t in range(2, 2 + start)]
    assert "leave" in events and c.success is False


def test_the_customer_answers_any_text():
    rng = random.Random(1)
    bank = [t for b in desk.PARAPHRASE_BANK.values() for t in b]
    words = list(desk.PRODUCTS) + ["#4410", "$45", "store credit", "refund", "voucher", "instead", "shall I",
                                   "done", "welcome", "goodbye", "\x00", "🙂", "{", "$", "#"]
    for case in range(300):
        c = desk.Customer(desk.make_scenario(rng.randrange(10 ** 6)), case)
        if case % 2:
            c.opening()
        for t in range(30):
            if rng.random() < 0.5:
                text = " ".join(rng.choice(words + bank) for _ in range(rng.randrange(0, 6)))
            else:
                text = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(0, 40)))
            utt, event, done = c.reply(text, t)
            assert isinstance(utt, str) and event in desk.EVENTS
            if done:
                break


# ----------------------------------------------------------------------------- knobs
def test_make_world_defaults_reproduce_the_module(runs):
    w = desk.make_world()
    assert (w.HORIZON, w.PARAPHRASES) == (desk.HORIZON, desk.PARAPHRASES)
    for name in desk.CONTRACT:
        assert hasattr(w, name)
    for name, policy in w.POLICIES.items():
        for i, sc in enumerate(SCENARIOS[:80]):
            assert w.play(sc, policy) == runs[name][i]
    assert w.reference(SCENARIOS[0]) == desk.reference(SCENARIOS[0])


@pytest.mark.parametrize("kw", [{"horizon": 0}, {"horizon": -3}, {"paraphrases": 0}, {"horizon": "24"},
                                {"paraphrases": 2.5}, {"horizon": True}])
def test_bad_knobs_raise_one_line_errors(kw):
    with pytest.raises(ValueError) as e:
        desk.make_world(**kw)
    assert "\n" not in str(e.value) and next(iter(kw)) in str(e.value)


def _template_re(template):
    return re.compile("^" + re.sub(r"\\\{\w+\\\}", ".+?", re.escape(template)) + "$")


def test_knobs_take_effect():
    short = desk.make_world(horizon=4)   # too short even for one request
    recs = [short.play(short.make_scenario(sc["seed"]), short.oracle_policy) for sc in SCENARIOS[:200]]
    assert max(len(agent_turns(r)) for r in recs) <= 4 and rate(recs) < 0.5
    assert all(len(r["ref_strategies"]) <= 4 for r in recs)
    one = desk.make_world(horizon=10)   # the grid's short cell: one request each, served in time
    scenarios = [one.make_scenario(sc["seed"]) for sc in SCENARIOS[:200]]
    assert {len(sc["requests"]) for sc in scenarios} == {1}
    assert {len(sc["requests"]) for sc in SCENARIOS} == {1, 2, 3}   # the default: 1-3
    assert rate([one.play(sc, one.oracle_policy) for sc in scenarios]) >= 0.95
    firsts = {key: _template_re(bank[0]) for key, bank in desk.PARAPHRASE_BANK.items()}
    used = {1: set(), 20: set()}
    for k in used:
        w = desk.make_world(paraphrases=k)
        for sc in SCENARIOS[:100]:
            for t in agent_turns(w.play(sc, w.behaviour_policy)):
                text = t["text"]
                if k == 1:
                    assert any(rx.match(text) for key, rx in firsts.items() if key.split("/")[0] == t["strategy"]), text
                used[k].add(re.sub(r"#\d{4}|\$\d+|" + desk._PRODUCT_RE.pattern, "", text))
    assert len(used[20]) > 5 * len(used[1])


def test_cs_ceiling_probe_puts_the_oracle_in_the_experts_seat(runs):
    """experiments/ceilings.py (the CS ceiling): whatever the (here untrained) models write, every decision is the
    oracle's for the dialogue as the world's tracker reads it."""
    import lm
    from experiments.ceilings import OracleDialogues
    texts = [t["text"] for r in runs["oracle"][:40] for t in r["turns"]] + list(desk.INSTRUCTIONS.values())
    tok = lm.train_tokenizer(texts, desk.STRATEGIES, vocab_size=512)
    models = [lm.build_tiny_model(tok, d_model=32, n_layer=1, n_head=2, max_len=4096, seed=s) for s in (0, 1)]
    for m in models:
        lm.add_strategy_tokens(m, tok, desk.STRATEGIES)
    trajs = OracleDialogues((models[0], tok), (models[1], tok), SCENARIOS[:4], desk).play(greedy=True, max_reply_tokens=8)
    for t, scenario in zip(trajs, SCENARIOS[:4]):
        turns = t["record"]["turns"]
        tr = desk.Tracker()
        tr.update(None, turns[0]["text"], "disclose")
        for a, c in zip(turns[1::2], turns[2::2]):
            assert a["strategy"] == desk.oracle_policy(tr, scenario, random.Random(0))
            tr.update(a["strategy"], c["text"], c["event"])
        assert turns[1]["strategy"] == "greet"


@pytest.fixture(scope="module")
def sft_desk():
    """A small SFT start on the desk for the learning tests: (expert, agent, tok, values)."""
    import torch
    import agent as agent_lib
    import expert as expert_lib
    import lm
    import tse
    logs = [desk.play(desk.make_scenario(s), desk.behaviour_policy) for s in data.train_seeds(60)]
    values = tse.event_values(logs, desk.SUCCESS_EVENTS)
    tok = lm.train_tokenizer([t["text"] for r in logs for t in r["turns"]] + list(desk.INSTRUCTIONS.values()),
                             desk.STRATEGIES, vocab_size=512)
    torch.manual_seed(0)
    expert_model = lm.build_tiny_model(tok, d_model=32, n_layer=2, n_head=2, max_len=4096, seed=0)
    agent_model = lm.build_tiny_model(tok, d_model=64, n_layer=2, n_head=2, max_len=4096, seed=1)
    for m in (expert_model, agent_model):
        lm.add_strategy_tokens(m, tok, desk.STRATEGIES)
    expert_lib.sft(expert_model, tok, logs, desk.STRATEGIES, desk.allowed, desk.INSTRUCTIONS, steps=40,
                   batch_size=8, lr=1e-2, seed=0)
    agent_lib.sft(agent_model, tok, logs, desk.INSTRUCTIONS, steps=200, batch_size=8, lr=1e-2, seed=0,
                  window_steps=100)
    return expert_model, agent_model, tok, values


@pytest.mark.parametrize("rollouts", ["independent", "branch", "fork"])
def test_a_short_gopo_run_on_the_desk_follows_its_preferences(sft_desk, rollouts, monkeypatch):
    """Four GOPO iterations on 16 desk training scenarios, and the same four with every preference
    pair swapped (the control): greedy R on those scenarios ends clearly higher after the real run,
    with independent rollouts, with --rollouts branch (K continuations of one dialogue) and with
    --rollouts fork (K - 1 forks of one dialogue, each paired with it: start 0.266, real 0.261,
    swapped 0.141, natively and under ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 alike).
    Independent, measured here (offsets 1000 and 2000): R 0.266 / 0.274 at the start, 0.271 / 0.263
    after the real run, 0.148 / 0.137 after the swapped one: gaps 0.122 / 0.127. At this budget GOPO
    holds R where the control loses it; 10 iterations raise it (0.266 -> 0.289, control 0.141).
    Branch: see the LEARNS line (-rP). The tiny CS Agent here (200 SFT steps) cannot copy order
    numbers, so most of R comes from ESNDCG, the Expert's own decisions; the CS Agent is frozen and
    greedy, so every change is the Expert's.

    No gain is asserted, only that R does not fall (by more than 0.03): at this budget there is no
    gain to assert. Measured (offset 1000), natively / under ATEN_CPU_CAPABILITY=default
    OMP_NUM_THREADS=1: start 0.266; independent real 0.271 / 0.263, swapped 0.148 / 0.148 (gains
    +0.005 / -0.003); branch real 0.250 / 0.250, swapped 0.148 / 0.148 (-0.016). A gain needs more
    iterations (10 above), 2.5x this test's time. The DPO term alone (nll_coef=0) does not hold here: real
    0.180 / 0.180 against swapped 0.148 / 0.148, a gap of 0.032 and a fall of 0.086, so this world
    has no nll_coef=0 case (the shop's learning test, tests/test_gopo.py, has)."""
    from types import SimpleNamespace
    from conftest import gopo_against_swapped
    expert_model, agent_model, tok, values = sft_desk
    scenarios = [desk.make_scenario(s) for s in data.train_seeds(16, offset=1000)]
    args = SimpleNamespace(k=4, beta=0.5, nll_coef=0.1, alpha=0.5, delta=0.05, max_pairs=4, listwise=False,
                           gopo_epochs=2, agent_temperature=0.0, cs_samples=0, beta_cs=0.1, max_reply_tokens=24,
                           ref="rollout", rollouts=rollouts, branch_at="entropy", segment=0)

    R0, real, swapped = gopo_against_swapped(expert_model, agent_model, tok, scenarios, values, desk, args, 4,
                                             1e-2, monkeypatch)
    print(f"LEARNS gopo on the desk, {rollouts}: start {R0:.3f} real {real:.3f} swapped {swapped:.3f}")
    assert real - swapped > 0.06, f"GOPO ({rollouts}) did not follow its preferences on the desk: start {R0:.3f}, " \
        f"real {real:.3f}, swapped {swapped:.3f}"
    assert real > R0 - 0.03, f"GOPO ({rollouts}) lost R on the desk: {R0:.3f} -> {real:.3f}"

"""A second world: a retail service desk where strategy has to be planned, not read off the last line.

It implements the world contract, written once in worlds/__init__.py (worlds.CONTRACT lists its
names), and adds:
  PARAPHRASES            default knob: paraphrases per strategy in the rule policies' text
  make_world(horizon, paraphrases)  the same names bound to other knobs (this package is the default);
                         a shorter horizon also caps the requests a customer brings (max_requests)
  Customer               also .sop_ok and .gate_breaks (agent turns whose reply broke a gate);
                         .order_value() is 0 if the task failed or a gate was broken
  record(...)            also "sop_ok"
  DECISION_GROUPS, decision_group(tracker)  the kinds of decision (eligibility, voucher/tier, ...)

The story. A customer brings a stack of 1-3 requests (an agenda, as in ConvLab's user simulator),
opens with the first and states the next only when asked "anything else?": buy a product (a
must-have, a budget, maybe a concern; a sold-out model -> its sibling instead), return or exchange
an order (past the tier's window -> store credit instead), or complain about a late delivery (Gold
members are owed a voucher). Hidden facts are disclosed once, never repeated: the tier only when
asked (verify); the order (number, item, amount) and the budget when asked or unasked in the
request; days since delivery and the concern unasked in the request. They decide steps several
turns later, when the customer's words no longer carry them: eligibility (days vs the tier's
window) after the policy is stated, the voucher after the apology, the concern after the
recommendation. Every question costs a point of patience and the customer has only 2-3 to spare,
so a wrong step (cost 2) or a repeated question soon loses them. Replies must copy slot values
(order number, amount, product) from earlier turns, or they do not work.

The files follow the story; every name above (and the extras the tests read) is importable from
here, so `from worlds import desk; desk.X` is the one way in:
  catalogue.py   the catalogue and orders, the SOP (allowed), scenarios, the agent's text (templates,
                 render, read_agent_text, recognise)
  customer.py    the customer simulator (SAY, Customer)
  policies.py    the Tracker and the rule policies (oracle, disclosed, behaviour, random), the decision
                 groups, read
  dialogues.py   whole dialogues (dialogue, play, record, reference)
  myopic.py      the myopic policy (fit_myopic, its Monte-Carlo search) and last_line_share
  __main__.py    the world card: python -m worlds.desk
The files import one way, in that order; none imports this one.
"""
import types

# the desk's names, from the files that tell its story: re-exported, so desk.X works for every X
from .catalogue import (ACCOUNT, ACTIONS, CORES, DAYS, EVENTS, FACTS, GREET_OPENERS, HORIZON, INSTRUCTIONS, LINES,
                        OPENERS, ORDERS, PARAPHRASE_BANK, PARAPHRASES, PRODUCTS, QUESTION, RETAIN, SOP, STRATEGIES,
                        SUCCESS_EVENTS, UNREAD, VOUCHER, WINDOW, WRONG, _CUES, _PRODUCT_RE, allowed, eligible,
                        make_scenario, max_requests, other_model, read_agent_text, recognise, render)
from .customer import R_NO_NEED, R_NOT_FOR, R_WHICH, R_WRONG, SAY, Customer
from .dialogues import dialogue, play, record, reference
from .myopic import _myopic, fit_myopic, last_line_share, myopic_policy
from .policies import (DECISION_GROUPS, PREREQ, Tracker, behaviour_policy, decision_group, disclosed_policy,
                       oracle_policy, random_policy, read)

POLICIES = {"oracle": oracle_policy, "disclosed": disclosed_policy, "behaviour": behaviour_policy,
            "random": random_policy, "myopic": myopic_policy}


# ----------------------------------------------------------------------------- knobs
# the names make_world binds: the world contract's (worlds.CONTRACT, tested) and the extras its tests read
CONTRACT = ["STRATEGIES", "INSTRUCTIONS", "allowed", "SOP", "EVENTS", "SUCCESS_EVENTS", "HORIZON", "PARAPHRASES",
            "make_scenario", "Customer", "recognise", "read_agent_text", "Tracker", "read", "POLICIES",
            "oracle_policy", "disclosed_policy", "DECISION_GROUPS", "decision_group", "behaviour_policy", "random_policy", "myopic_policy", "play", "dialogue", "record", "reference"]


def make_world(horizon=HORIZON, paraphrases=PARAPHRASES):
    """The contract names bound to other knobs; with the defaults it behaves exactly like this package."""
    for name, v in (("horizon", horizon), ("paraphrases", paraphrases)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    w = types.SimpleNamespace(**{n: globals()[n] for n in CONTRACT})
    w.HORIZON, w.PARAPHRASES = horizon, paraphrases
    w.myopic_policy = myopic_policy if horizon == HORIZON else _myopic(horizon)
    w.POLICIES = dict(POLICIES, myopic=w.myopic_policy)
    w.make_scenario = lambda seed: make_scenario(seed, horizon)
    w.dialogue = lambda scenario, policy, seed=0, horizon=horizon: \
        dialogue(scenario, policy, seed, horizon, paraphrases)
    w.play = lambda scenario, policy, seed=0, horizon=horizon: play(scenario, policy, seed, horizon, paraphrases)
    w.record = lambda scenario, turns, cust, source: record(scenario, turns, cust, source, horizon)
    w.reference = lambda scenario: reference(scenario, horizon)
    return w

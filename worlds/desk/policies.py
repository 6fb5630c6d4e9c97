"""The rule policies and what they read: the Tracker (what an agent can read off the dialogue), the
oracle (reads the hidden scenario; defines z*), the disclosed policy (the oracle's plan from what the
dialogue disclosed), the behaviour policy (writes the training logs), the random one, the decision
groups, and `read` (the tracker before each agent turn of a logged dialogue).

The myopic policy, which needs whole dialogues to be fitted, is in myopic.py.
"""
import re

from .catalogue import FACTS, LINES, WINDOW, _PRODUCT_RE, allowed, eligible
from .customer import SAY

# ----------------------------------------------------------------------------- policies
class Tracker:
    """What an agent can read off the dialogue: its own choices, the customer's words and events."""

    def __init__(self):
        self.prev, self.strategies, self.last_text, self.last_event = None, [], "", None
        self.tier, self.index, self.no_more = None, -1, False
        self._request(None)

    def _request(self, kind):
        self.kind, self.days, self.order, self.amount, self.line, self.budget, self.concern = (kind,) + (None,) * 6
        self.liked = self.sold = None
        self.answered = self.policy = self.alt_ok = self.apologised = self.done = False

    verified = property(lambda self: self.tier is not None)
    confirmed = property(lambda self: self.prev == "confirm" and self.last_event == "agree")

    def eligible(self):     # what a careful agent can work out: days (the request) vs the tier's window
        return None if self.days is None or self.tier is None else self.days <= WINDOW[self.tier]

    def update(self, strategy, text, event):
        """Read one customer turn; strategy None with event "disclose" reads the opening line."""
        self.prev, self.last_text, self.last_event = strategy, text, event
        if strategy is not None:
            self.strategies.append(strategy)
        products, money = _PRODUCT_RE.findall(text), re.search(r"\$(\d+)", text)
        statement = strategy in (None, "anything_else") and event == "disclose"
        if statement:
            self.index += 1
            self._request("exchange" if "exchange" in text else "return" if "return" in text else
                          "complaint" if "late" in text else "buy")
            days = re.search(r"(\d+) days ago", text)
            self.days = int(days.group(1)) if days else None
            self.line = next((line for line in LINES if f"{line[1]} {line[0]}" in text), None)
            self.concern = next((c for c in FACTS if SAY[c][0] in text), None)
        if event == "disclose" and money and self.kind == "buy":
            self.budget = int(money.group(1))
        if strategy == "verify" and event == "disclose":
            self.tier = "Gold" if "Gold" in text else "Standard"
        if (statement or strategy == "ask_order") and event == "disclose" and "#" in text:
            self.order, self.amount = re.search(r"#(\d{4})", text).group(1), int(money.group(1))
        if "sold out" in text and products:
            self.sold = products[0]
        if strategy in ("recommend", "offer_alternative") and event == "positive":
            self.liked, self.alt_ok = (products[0], False) if products else (None, True)
        self.answered |= strategy == "answer" and event == "positive"
        self.policy |= strategy == "state_policy" and event == "positive"
        self.apologised |= strategy == "apologise" and event == "positive"
        self.done |= event == "resolved"
        self.no_more |= strategy == "anything_else" and event == "positive"

    def pick(self):
        """The model to name: the best the known budget allows (the budget model while it is unknown)."""
        a, _, b, pb = LINES[self.line or ("laptop", "light")]
        return b if self.budget is not None and self.budget >= pb else a


PREREQ = {"compensate": "apologise", "confirm": "state_policy", "execute": "confirm", "ask_order": "verify"}


def _first_allowed(z, tracker, rng=None):
    """`z` if the SOP allows it, else its prerequisite, else move on (off the planned path only)."""
    ok = allowed(tracker.strategies)
    return next((c for c in (z, PREREQ.get(z), "anything_else", "close") if c in ok), None) or \
        (rng.choice(ok) if rng else ok[0])


def oracle_policy(tracker, scenario, rng=None):
    """The ideal run: it reads hidden facts (eligibility, tier, what is left on the stack) instead of
    guessing; deterministic given the scenario and the dialogue so far. It defines z*."""
    if not tracker.strategies:
        return "greet"
    r, tier = scenario["requests"][tracker.index], scenario["tier"]
    return _plan(tracker, r["kind"], r["concern"], tier, r["kind"] == "buy" or eligible(r, tier),
                 tracker.index + 1 < len(scenario["requests"]))


def disclosed_policy(tracker, scenario=None, rng=None):
    """The oracle's plan made only from what the dialogue has disclosed (the tracker), never the
    scenario: the best labels a reader of the dialogue can learn. Every fact the oracle uses is told
    before it is needed (the request and its days in the statement, the tier at verify, which the SOP
    puts before any eligibility or voucher step) except one: whether more requests are left. So it
    asks "anything else?" after each settled request, where the oracle closes after the last one."""
    if not tracker.strategies:
        return "greet"
    return _plan(tracker, tracker.kind, tracker.concern, tracker.tier, tracker.eligible() is not False, more=True)


def _plan(tracker, kind, concern, tier, eligible_now, more):
    """The oracle's step for the current request, given its kind, concern, the tier, whether it is
    inside the window, and whether more requests are left after it."""
    if tracker.no_more or tracker.done or (kind == "complaint" and tracker.apologised and tier != "Gold"):
        z = "anything_else" if more and not tracker.no_more else "close"
    elif kind == "buy":
        z = ("ask_need" if tracker.budget is None else
             ("offer_alternative" if tracker.sold else "recommend") if tracker.liked is None else
             "answer" if concern and not tracker.answered else "execute" if tracker.confirmed else "confirm")
    elif tracker.order is None or not tracker.verified:
        z = "ask_order" if tracker.order is None else "verify"
    elif kind == "complaint":
        z = "compensate" if tracker.apologised else "apologise"
    else:
        z = ("state_policy" if not tracker.policy else "answer" if concern and not tracker.answered else
             "offer_alternative" if not eligible_now and not tracker.alt_ok else
             "execute" if tracker.confirmed else "confirm")
    return _first_allowed(z, tracker)


DECISION_GROUPS = ("eligibility", "voucher/tier", "request stack", "rest")


def decision_group(tracker):
    """Which kind of decision an agent faces at this point of the dialogue (tracker: the tracker before
    it). The groups the desk was built around need a fact told turns earlier:
      eligibility    a return / exchange whose terms are stated: confirm it, or offer store credit
                     (days since delivery, in the request, against the tier's window, told at verify);
      voucher/tier   a complaint after the apology: a voucher for Gold members, move on for Standard;
      request stack  a request is settled: "anything else?", or goodbye once the customer has no more;
      rest           everything else (greet, the questions, the steps the last line asks for)."""
    if tracker.done or tracker.no_more:
        return "request stack"
    if tracker.kind == "complaint" and tracker.apologised:
        return "voucher/tier"
    if tracker.kind in ("return", "exchange") and tracker.policy and not tracker.alt_ok and not tracker.confirmed and \
            (tracker.concern is None or tracker.answered):
        return "eligibility"
    return "rest"


def read(turns):
    """The tracker before each agent turn of a dialogue's turns, as the rule policies saw it in
    dialogue(): one Tracker, yielded before each agent turn and updated in place after it (read it
    before asking for the next)."""
    tracker = Tracker()
    tracker.update(None, turns[0]["text"], "disclose")
    for i in range(1, len(turns), 2):
        yield tracker
        if i + 1 < len(turns):
            tracker.update(turns[i]["strategy"], turns[i + 1]["text"], turns[i + 1]["event"])


def behaviour_policy(tracker, scenario, rng, eps=0.05):
    """A typical human agent, sensible on average, with costly habits: names a model before asking the
    budget (40%), confirms before answering a stated concern (50%), confirms a refund without checking
    the window (50%), gives every complainer a voucher (70%), always asks "anything else?"."""
    if not tracker.strategies:
        return "greet"
    if rng.random() < eps:
        return rng.choice(allowed(tracker.strategies))
    concern = tracker.concern and not tracker.answered and (tracker.last_text in SAY["not_ready"] or rng.random() < 0.5)
    if tracker.no_more or tracker.done:
        z = "close" if tracker.no_more else "anything_else"
    elif tracker.kind == "buy":
        z = ("ask_need" if tracker.budget is None and tracker.liked is None and (tracker.prev == "recommend" or rng.random() < 0.6)
             else ("offer_alternative" if tracker.sold else "recommend") if tracker.liked is None
             else "answer" if concern else "execute" if tracker.confirmed else "confirm")
    elif not tracker.verified or tracker.order is None:
        z = "verify" if not tracker.verified else "ask_order"
    elif tracker.kind == "complaint":
        z = "apologise" if not tracker.apologised else "compensate" if rng.random() < 0.7 else "anything_else"
    else:
        z = ("state_policy" if not tracker.policy else "execute" if tracker.confirmed else "answer" if concern else
             "offer_alternative" if tracker.eligible() is False and not tracker.alt_ok and
             tracker.last_text not in SAY["refuse_alt"] and rng.random() < 0.5 else "confirm")
    return _first_allowed(z, tracker, rng)


def random_policy(tracker, scenario, rng):
    """Uniform over the SOP-allowed strategies."""
    return rng.choice(allowed(tracker.strategies))

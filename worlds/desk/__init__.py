"""A second world: a retail service desk where strategy has to be planned, not read off the last line.

THE WORLD CONTRACT (worlds/shop.py and this package implement it; a fork implements it for its own domain)
  STRATEGIES             strategy names, the Expert's action space
  INSTRUCTIONS           strategy -> one short line the CS Agent follows (it is in every turn)
  allowed(strategies)    the strategies the SOP allows now, given those chosen so far in this dialogue
                         ([] at the first agent turn), in STRATEGIES order; [] means the dialogue ends
  SOP                    the hard rules, for humans
  EVENTS, SUCCESS_EVENTS engagement events a customer turn carries ("leave" among them)
  HORIZON, PARAPHRASES   default knobs: max agent turns, paraphrases per strategy
  make_scenario(seed)    deterministic hidden goal, a JSON-able dict with a "seed" key
  Customer(scenario, seed)  .opening(); .reply(text, turn) -> (utterance, event, done); .success;
                         .sop_ok, .gate_breaks (agent turns whose reply broke a gate); .order_value()
                         (business value, 0 if failed or a gate was broken)
  recognise(text)        the strategy read off an agent reply's surface, or None
  Tracker                what an agent can read off the dialogue (.prev, .strategies, .last_text, ...);
                         .update(strategy, customer_text, event)
  POLICIES               rule policies, policy(tr, scenario, rng) -> strategy: "oracle" (defines z*),
                         "behaviour" (writes the logs), "random", "myopic"
  dialogue(scenario, policy, seed=0, horizon=HORIZON) -> (turns, customer); turns alternate, customer
                         first: {"role", "text", "strategy" (agent turns), "event" (customer turns)}
  play(...)              -> record(scenario, turns, cust, source) = {"id", "source", "scenario", "turns",
                         "success", "ref_strategies", "order_value", "sop_ok"}
  reference(scenario)    z*, the oracle's strategy sequence
  make_world(horizon, paraphrases)  the same names bound to other knobs (this module is the default);
                         a shorter horizon also caps the requests a customer brings (max_requests)

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
"""
import copy
import random
import re
import types
from collections import Counter, defaultdict

# ----------------------------------------------------------------------------- catalogue and orders
LINES = {  # (category, must-have) -> (budget model, price, premium model, price)
    ("laptop", "light"): ("Aero", 899, "Aero Pro", 1299), ("laptop", "gaming"): ("Titan", 1199, "Titan X", 1699),
    ("phone", "compact"): ("Mini", 499, "Mini Max", 699), ("phone", "rugged"): ("Volt", 599, "Volt Max", 799),
    ("headset", "wireless"): ("Echo", 149, "Echo Plus", 229), ("headset", "quiet"): ("Calm", 249, "Calm Pro", 349)}
PRODUCTS = {n: (line, p) for line, (a, pa, b, pb) in LINES.items() for n, p in ((a, pa), (b, pb))}
ORDERS = {"4410": ("kettle", 45), "4423": ("desk lamp", 60), "4437": ("rain jacket", 110), "4452": ("blender", 85),
          "4468": ("backpack", 70), "4471": ("toaster", 40), "4489": ("office chair", 120), "4495": ("grinder", 55),
          "4502": ("hair dryer", 35), "4516": ("towel set", 30), "4528": ("yoga mat", 25), "4533": ("table fan", 50)}
WINDOW = {"Standard": 30, "Gold": 60}       # return/exchange window in days, by tier
DAYS = [10, 20, 40, 50, 75]                 # 40 and 50 days: eligible for Gold members only
FACTS = {"delivery": "free two-day delivery", "warranty": "a two-year warranty", "speed": "a one-day turnaround"}
RETAIN, VOUCHER = 50, 20                    # value of a service customer kept; cost of a voucher
QUESTION, WRONG, UNREAD = 1, 2, 1           # patience costs


def other_model(name):
    a, _, b, _ = LINES[PRODUCTS[name][0]]
    return b if name == a else a


def eligible(req, tier):
    return req["days"] <= WINDOW[tier]


# ----------------------------------------------------------------------------- SOP
STRATEGIES = ["greet", "verify", "ask_order", "ask_need", "recommend", "answer", "state_policy",
              "offer_alternative", "confirm", "execute", "apologise", "compensate", "anything_else", "close"]
INSTRUCTIONS = {
    "greet": "welcome them", "verify": "verify their identity", "ask_order": "ask for the order number",
    "ask_need": "ask their budget", "recommend": "recommend the product that fits",
    "answer": "answer their concern", "state_policy": "state the return policy for the order",
    "offer_alternative": "offer the alternative", "confirm": "ask to confirm the action",
    "execute": "carry out the confirmed action", "apologise": "apologise about the order",
    "compensate": "give a $20 voucher for the order", "anything_else": "ask if there is anything else",
    "close": "say goodbye"}
SOP = """Hard rules. allowed() applies them to the strategy history; a reply read as breaking one voids
the dialogue's outcome (success False, order value 0, sop_ok False).
  1. Greet first, once; nothing after goodbye.
  2. Identity: verify the customer (once) before acting on an order: stating its policy, offering
     store credit, apologising for it, compensating.
  3. Terms first: confirm only after stating the policy in this request, or, for a sale with no
     order involved, after recommending the product.
  4. Consent: execute only right after a confirmation; after executing or compensating, one action
     per request: only 'anything else' or goodbye.
  5. Compensation only after apologising in this request.
Business rules the systems check (no history can show them): refunds and exchanges only inside the
tier's window (Standard 30 days, Gold 60), otherwise store credit; vouchers for Gold members only."""
EVENTS = ["disclose", "positive", "neutral", "negative", "agree", "resolved", "satisfied", "leave"]
SUCCESS_EVENTS = ("satisfied",)
HORIZON = 24
PARAPHRASES = 20
ACCOUNT = ("state_policy", "apologise", "compensate")


def allowed(strategies):
    """A(h_t) from the whole strategy history; a request's steps start after greet / anything_else."""
    if not strategies:
        return ["greet"]
    if strategies[-1] == "close":
        return []
    cut = max((i for i, z in enumerate(strategies) if z in ("greet", "anything_else")), default=-1)
    seg, verified = strategies[cut + 1:], "verify" in strategies
    out = []
    for z in STRATEGIES:
        blocked = (z == "greet" or (z == "verify" and verified)                               # SOP 1, 2
                   or (not verified and (z in ACCOUNT or (z == "offer_alternative" and "ask_order" in seg)))
                   or (z == "confirm" and "state_policy" not in seg
                       and not ("recommend" in seg and "ask_order" not in seg))                   # SOP 3
                   or (z == "execute" and strategies[-1] != "confirm")                            # SOP 4
                   or (("execute" in seg or "compensate" in seg) and z not in ("anything_else", "close"))
                   or (z == "compensate" and "apologise" not in seg))                             # SOP 5
        if not blocked:
            out.append(z)
    return out


# ----------------------------------------------------------------------------- scenarios
def max_requests(horizon):
    """The most requests a customer brings: as many as the horizon serves, one per 8 agent turns (the
    oracle needs at most 9 for one request, 15 for two, 22 for three), and at least one. The default
    24 turns allow all three; 10 turns make the grid's short cell, one request, about shop's length."""
    return max(1, min(3, horizon // 8))


def make_scenario(seed, horizon=HORIZON):
    """The hidden goal of customer `seed` (deterministic) in a world of this horizon."""
    rng = random.Random(f"desk/{seed}")
    orders, requests = rng.sample(sorted(ORDERS), 3), []
    for i in range(min(rng.choices([1, 2, 3], [0.2, 0.4, 0.4])[0], max_requests(horizon))):
        kind = rng.choices(["buy", "return", "exchange", "complaint"], [0.3, 0.2, 0.2, 0.3])[0]
        if kind == "buy":   # the customer wants the best model the budget allows
            line = rng.choice(sorted(LINES))
            a, pa, b, pb = LINES[line]
            premium = rng.random() < 0.5
            budget = -(-pb // 100) * 100 + rng.choice([0, 100]) if premium else \
                min(-(-pa // 100) * 100 + rng.choice([0, 100]), pb - 1)
            requests.append({"kind": kind, "category": line[0], "feature": line[1], "product": b if premium else a,
                             "budget": budget, "budget_told": rng.random() < 0.4, "in_stock": rng.random() < 0.7,
                             "concern": rng.choice([None, None, "delivery", "warranty"])})
        else:
            requests.append({"kind": kind, "order": orders[i], "days": rng.choice(DAYS),
                             "order_told": rng.random() < 0.4,
                             "concern": rng.choice([None, "speed"]) if kind != "complaint" else None})
    service = [r for r in requests if r["kind"] != "buy"]
    needed = (bool(service) + sum(not r["order_told"] for r in service) + len(requests) - 1
              + sum(r["kind"] == "buy" and not r["budget_told"] for r in requests))   # the oracle's questions
    return {"seed": seed, "tier": rng.choice(["Gold", "Standard"]), "requests": requests,
            "patience": needed + rng.choice([2, 3])}


# ----------------------------------------------------------------------------- agent text
# 4 cores per strategy with the cue mid-sentence, times 5 openers = 20 paraphrases. Slots come from
# what the dialogue disclosed; confirm / execute carry an {action} phrase naming what is done to what.
OPENERS = ["", "Okay, ", "Right, ", "Alright, ", "Well, "]
GREET_OPENERS = ["", "Hi, ", "Hello, ", "Hi there, ", "Good morning, "]
CORES = {
    "greet": ["welcome to the help desk, I'm glad to help.", "you're very welcome here, happy to help with that.",
              "and welcome! Let me sort that out for you.", "a warm welcome to our store, I'm on it."],
    "verify": ["first I need to verify your account. Your email and postcode?",
               "for your security I must verify you. Email and postcode, please.",
               "I'll just verify who you are: your email and postcode?",
               "before we go on, please help me verify your identity with your email."],
    "ask_order": ["what's the order number, please?", "could you give me the order number?",
                  "I'll need the order number to look it up.", "to find it, which order number is it?"],
    "ask_need": ["what must it have, and what's your budget?", "tell me your budget for it?",
                 "so I pick well, what budget do you have in mind?", "to narrow it down, what's the budget?"],
    "recommend": ["for that I'd recommend the {product}.", "I'd suggest the {product}, it fits you well.",
                  "my recommendation is the {product}.", "the {product} is what I would suggest."],
    "answer": ["good news: {thing} comes with {fact}.", "yes, {thing} gets {fact}.",
               "about that, {thing} has {fact}.", "you'll get {fact} with {thing}."],
    "state_policy": ["our policy lets order #{order} come back within 30 days, 60 for Gold.",
                     "under our policy, order #{order} has a 30-day window (60 for Gold).",
                     "for order #{order} the policy is 30 days to return it, 60 for Gold.",
                     "as for order #{order}, our policy allows 30 days, or 60 for Gold members."],
    "offer_alternative/product": [
        "the {sold} is gone, so I can offer the {product} instead.",
        "since the {sold} sold out, take the {product} instead at that price.",
        "sadly no {sold}, but the {product} works instead.", "we could go with the {product} instead of the {sold}."],
    "offer_alternative/credit": [
        "order #{order} is past the window, so I can offer store credit instead.",
        "for order #{order} I can give you store credit instead.",
        "a refund isn't possible for order #{order}, store credit instead.",
        "what I can do for order #{order} is store credit instead."],
    "confirm": ["just to be sure, shall I {action}?", "so, do you want me to {action}?",
                "before I go ahead, may I {action}?", "all clear then, should I {action} now?"],
    "execute": ["that's done: I have {action}.", "all processed, I have {action}.",
                "it's done now, I've {action}.", "good news, I have {action}, all processed."],
    "apologise": ["I'm so sorry about the trouble with order #{order}.",
                  "please accept my apologies for order #{order}.",
                  "about order #{order}, I'm truly sorry.", "I do apologise for how order #{order} went."],
    "compensate": ["to make up for order #{order}, here's a $20 voucher.",
                   "you get a $20 voucher for order #{order}.",
                   "for order #{order} I've added a $20 voucher to your account.",
                   "please take a $20 voucher for the trouble with order #{order}."],
    "anything_else": ["is there anything else I can help with?", "can I help you with anything else today?",
                      "before we finish, anything else I can do?", "tell me, is there anything else?"],
    "close": ["thanks for your time, and goodbye!", "it was a pleasure, goodbye for now.",
              "have a lovely day and take care.", "all the best, goodbye!"]}
ACTIONS = {  # action -> (as confirmed, as executed)
    "buy": ("order the {product} for you", "ordered the {product} for you"),
    "refund": ("refund ${amount} for order #{order}", "refunded ${amount} for order #{order}"),
    "exchange": ("exchange order #{order}", "set up the exchange of order #{order}"),
    "credit": ("give store credit for order #{order}", "added store credit to order #{order}")}
PARAPHRASE_BANK = {key: [o + c if o else c[0].upper() + c[1:]
                         for o in (GREET_OPENERS if key == "greet" else OPENERS) for c in cores]
                   for key, cores in CORES.items()}
_CUES = [(z, re.compile(p)) for z, p in [  # first match wins; no core holds another strategy's cue
    ("close", r"goodbye|take care"), ("compensate", r"voucher"), ("offer_alternative", r"\binstead\b"),
    ("state_policy", r"\bpolicy\b"), ("answer", "|".join(FACTS.values())), ("execute", r"\bdone\b|processed"),
    ("confirm", r"shall i|do you want me to|may i|should i"), ("apologise", r"sorry|apologi"),
    ("verify", r"\bverify\b"), ("ask_order", r"order number"), ("ask_need", r"\bbudget\b"),
    ("recommend", r"recommend|suggest"), ("anything_else", r"anything else"), ("greet", r"\bwelcome\b")]]
_PRODUCT_RE = re.compile(r"\b(" + "|".join(sorted(PRODUCTS, key=len, reverse=True)) + r")\b")


def read_agent_text(text):
    """(strategy or None, slots) read off an agent reply's surface: what the customer and GRE see."""
    low = text.lower()
    act = next((z for z, rx in _CUES if rx.search(low)), None)
    action = "credit" if "store credit" in low else "refund" if "refund" in low else \
        "exchange" if "exchange" in low else "buy"
    return act, {"products": _PRODUCT_RE.findall(text), "orders": re.findall(r"#(\d{4})\b", text),
                 "amounts": [int(a) for a in re.findall(r"\$(\d{1,6})\b", text)], "action": action,
                 "fact": next((k for k, v in FACTS.items() if v in low), None)}


def recognise(text):
    return read_agent_text(text)[0]


def render(strategy, tr, rng, paraphrases=PARAPHRASES):
    """Template text for `strategy`, its slots filled from what the tracker read off the dialogue."""
    product, key = tr.liked or tr.pick(), strategy
    if strategy == "offer_alternative":
        key, product = key + ("/product" if tr.kind == "buy" else "/credit"), other_model(tr.sold or product)
    slots = {"product": product, "sold": tr.sold or other_model(product), "order": tr.order or "0000",
             "amount": tr.amount or 0, "fact": FACTS[tr.concern or "delivery"]}
    slots["thing"] = f"the {product}" if tr.kind == "buy" else f"order #{slots['order']}"
    if strategy in ("confirm", "execute"):
        action = "buy" if tr.kind == "buy" else "credit" if tr.alt_ok else \
            "exchange" if tr.kind == "exchange" else "refund"
        slots["action"] = ACTIONS[action][strategy == "execute"].format(**slots)
    return rng.choice(PARAPHRASE_BANK[key][:paraphrases]).format(**slots)


# ----------------------------------------------------------------------------- customer simulator
SAY = {
    "open": ["Hi. ", "Hello. ", "Good morning. "], "more": ["Yes, one more thing. {statement}"],
    "buy": ["I'm looking for a {feature} {category}.", "I want to buy a {feature} {category}."],
    "return": ["I'd like to return an item; it arrived {days} days ago.",
               "I want to return something I got {days} days ago."],
    "exchange": ["I need to exchange an item I got {days} days ago.",
                 "Can I exchange something? It came {days} days ago."],
    "complaint": ["My last order arrived late and I'm not happy.", "I want to complain about a late delivery."],
    "budget_unasked": [" My budget is ${budget}."],
    "order_unasked": [" It's order #{order}, the {item} for ${amount}."],
    "delivery": [" Fast delivery matters to me."], "warranty": [" The warranty matters to me."],
    "speed": [" I need it sorted quickly."], "hi": ["Hi, thanks.", "Hello."],
    "verified": ["Sure, I'm a {tier} member.", "Of course. I'm a {tier} member."],
    "order": ["It's order #{order}, the {item} for ${amount}.", "Order #{order}: the {item}, ${amount}."],
    "budget": ["Up to ${budget}.", "My budget is ${budget}."],
    "like": ["The {product} sounds good.", "Okay, the {product} could work."],
    "sold_out": ["Hmm, the {product} shows as sold out.", "The site says the {product} is sold out."],
    "alt_ok": ["Okay, {thing} works for me.", "Fine, I'll take {thing}."],
    "understood": ["Okay, understood.", "I see, thanks."], "helps": ["Great, that helps.", "Good to know."],
    "agree": ["Yes, please go ahead.", "Yes, do it."], "done": ["Great, thank you.", "Perfect, thanks."],
    "apology_ok": ["Thank you, I appreciate it.", "Thanks for saying that."],
    "voucher_ok": ["That's kind, thank you.", "Oh, nice, thanks."],
    "no_more": ["No, that's all, thanks.", "Nothing else, thanks."],
    "not_sorted": ["Hold on, my issue isn't sorted yet."], "told": ["I already told you that."],
    "wrong": ["That's not what I'm after.", "No, that's not right."], "over_budget": ["That's over my budget."],
    "better": ["I was hoping for something better."], "not_for": ["That's not what I came for."],
    "which_order": ["Which order do you mean?"], "refuse_alt": ["I'd rather get what I asked for."],
    "not_ready": ["Not yet, I still have a concern."], "not_agreed": ["I didn't agree to that."],
    "no_need": ["I didn't ask about that."], "gate": ["Hold on, that's not how this should go."],
    "confused": ["Sorry, I don't follow.", "What do you mean?"],
    "declined": ["Wait, it says the request was declined? Forget it."],
    "voucher_fail": ["The voucher says I'm not eligible? Unbelievable. Bye."],
    "bye_ok": ["Thanks, goodbye!", "Great, bye!"],
    "bye_leave": ["This didn't solve my problem. Bye.", "I'll take my business elsewhere."]}
R_WRONG, R_NOT_FOR = ("wrong", "negative", WRONG), ("not_for", "negative", WRONG)
R_WHICH, R_NO_NEED = ("which_order", "neutral", UNREAD), ("no_need", "neutral", UNREAD)


class Customer:
    """Rule-based customer with a request stack; it reads the agent's *text*, not its strategy."""

    def __init__(self, scenario, seed=0):
        self.s, self.reqs = scenario, scenario["requests"]
        self.rng = random.Random(f"desk/{scenario['seed']}/{seed}")  # wording only; the rules are exact
        self.patience, self.read, self.i, self.r, self.st = scenario["patience"], [], -1, None, {}
        self.gate_breaks, self.success, self.value = [], False, 0.0   # agent turns whose reply broke a gate

    sop_ok = property(lambda self: not self.gate_breaks)

    def say(self, key, **kw):
        return self.rng.choice(SAY[key]).format(**kw)

    def opening(self):
        """The first request, so the greeting's reply carries nothing the agent must act on."""
        return self.say("open") + self._next()

    def _next(self):
        """Pop the next request; its statement carries the unasked facts, once."""
        self.i += 1
        self.r = r = self.reqs[self.i]
        self.st = {"order": r["kind"] != "buy" and r["order_told"], "budget": r["kind"] == "buy" and r["budget_told"]}
        text = self.say(r["kind"], **r) + (self.say("budget_unasked", **r) if self.st["budget"] else "")
        text += self.say("order_unasked", **self._order()) if self.st["order"] else ""
        return text + (self.say(r["concern"]) if r["concern"] else "")

    def _order(self):
        return {"order": self.r["order"], "item": ORDERS[self.r["order"]][0], "amount": ORDERS[self.r["order"]][1]}

    def reply(self, text, turn):
        """React to the agent's reply at agent turn `turn` -> (utterance, event, done)."""
        if self.r is None:          # opening() belongs to the contract; stay safe if a caller skipped it
            self.opening()
        act, got = read_agent_text(text)
        gate_ok = act is None or act in allowed(self.read)
        if not gate_ok:             # the act is not carried out, and the dialogue's outcome is void
            self.gate_breaks.append(turn)
        elif act is not None:       # the history of acts carried out, which the gates read
            self.read.append(act)
        if act == "close":
            self.success = self.sop_ok and self.i == len(self.reqs) - 1 and self.st.get("done", False)
            return (self.say("bye_ok"), "satisfied", True) if self.success else (self.say("bye_leave"), "leave", True)
        key, event, cost, *kw = ("confused", "neutral", UNREAD) if act is None else \
            ("gate", "negative", WRONG) if not gate_ok else self._react(act, got)
        if cost is None:            # a consequential mistake the systems refuse: the customer gives up
            return self.say(key), "leave", True
        self.patience -= cost
        if self.patience <= 0:
            return self.say("bye_leave"), "leave", True
        return self.say(key, **(kw[0] if kw else {})), event, False

    def _react(self, act, got):
        """(what to say, event, patience cost[, slots]) for an act the SOP allows."""
        r, st, kind, tier = self.r, self.st, self.r["kind"], self.s["tier"]
        on_order = kind != "buy" and r["order"] in got["orders"]
        if act == "greet":
            return "hi", "positive", 0
        if act == "verify":
            return "verified", "disclose", QUESTION, {"tier": tier}
        if act in ("ask_order", "ask_need"):
            fact = "order" if act == "ask_order" else "budget"
            if (kind == "buy") != (fact == "budget") or st[fact]:
                return ("told" if st[fact] else "not_for"), "negative", WRONG
            st[fact] = True
            return fact, "disclose", QUESTION, self._order() if fact == "order" else {"budget": r["budget"]}
        if act == "recommend":
            name = got["products"][0] if got["products"] and kind == "buy" else None
            if name is None or name == st.get("liked") or (name == r["product"] and st.get("sold")):
                return R_NOT_FOR if kind != "buy" else ("told" if name else "confused", "neutral", UNREAD)
            if name != r["product"]:
                return ("wrong" if PRODUCTS[name][0] != (r["category"], r["feature"]) else
                        "over_budget" if PRODUCTS[name][1] > r["budget"] else "better"), "negative", WRONG
            st["sold" if not r["in_stock"] else "liked"] = name
            return ("like", "positive", 0, {"product": name}) if r["in_stock"] else \
                ("sold_out", "neutral", 0, {"product": name})
        if act == "offer_alternative":
            if kind == "buy":
                alt = other_model(r["product"])
                if not (st.get("sold") and alt in got["products"] and not st.get("liked")):
                    return R_WRONG
                st["liked"] = alt
                return "alt_ok", "positive", 0, {"thing": f"the {alt}"}
            if kind == "complaint" or not on_order:
                return R_NOT_FOR if kind == "complaint" else R_WHICH
            if eligible(r, tier):          # steering a customer owed a refund to store credit
                return "refuse_alt", "negative", WRONG
            st["alt"] = True
            return "alt_ok", "positive", 0, {"thing": "store credit"}
        if act == "state_policy":
            if kind in ("buy", "complaint"):
                return R_NOT_FOR
            return ("understood", "positive", 0) if on_order else R_WHICH
        if act == "answer":
            about = st.get("liked") in got["products"] if kind == "buy" else on_order
            if not (about and r["concern"] and got["fact"] == r["concern"] and not st.get("answered")):
                return R_NO_NEED
            st["answered"] = True
            return "helps", "positive", 0
        if act == "confirm":
            st["confirmed"] = self._wanted(got)
            if st["confirmed"] and r["concern"] and not st.get("answered"):
                st["confirmed"] = None
                return "not_ready", "negative", WRONG
            return ("agree", "agree", 0) if st["confirmed"] else R_WRONG   # yes, even to a refund policy refuses
        if act == "execute":
            if not st.get("confirmed") or self._wanted(got) != st["confirmed"]:
                return ("wrong" if st.get("confirmed") else "not_agreed"), "negative", WRONG
            if st["confirmed"] in ("refund", "exchange") and not eligible(r, tier):
                return "declined", "leave", None
            st["done"] = True
            self.value += min(PRODUCTS[r["product"]][1], PRODUCTS[st["liked"]][1]) if kind == "buy" else RETAIN
            return "done", "resolved", 0
        if act == "apologise":
            if kind != "complaint" or st.get("apologised") or not on_order:
                return R_WHICH if kind == "complaint" and not st.get("apologised") else R_NO_NEED
            st["apologised"] = True
            if tier != "Gold":              # a Standard member is content with a sincere apology
                st["done"] = True
                self.value += RETAIN
            return "apology_ok", "positive", 0
        if act == "compensate":
            if kind != "complaint" or not on_order:
                return R_NOT_FOR
            if tier != "Gold":              # the voucher system refuses it in front of the customer
                return "voucher_fail", "leave", None
            if st.get("done"):
                return R_NO_NEED
            st["done"] = True
            self.value += RETAIN - VOUCHER
            return "voucher_ok", "resolved", 0
        # anything_else: pop the next request only once this one is settled
        if not st.get("done"):
            return "not_sorted", "negative", WRONG
        if self.i + 1 < len(self.reqs):
            return "more", "disclose", QUESTION, {"statement": self._next()}
        return "no_more", "positive", 0

    def _wanted(self, got):
        """The action this request agrees to, if `got` names it with the right slots, else None."""
        r, st = self.r, self.st
        if r["kind"] == "buy":
            return "buy" if st.get("liked") in got["products"] and got["action"] == "buy" else None
        if r["kind"] == "complaint" or r["order"] not in got["orders"]:
            return None
        want = "credit" if st.get("alt") else "refund" if r["kind"] == "return" else "exchange"
        if want == "refund" and ORDERS[r["order"]][1] not in got["amounts"]:
            return None
        return want if got["action"] == want else None

    def order_value(self):
        return self.value if self.success and self.sop_ok else 0.0


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


def _first_allowed(z, tr, rng=None):
    """`z` if the SOP allows it, else its prerequisite, else move on (off the planned path only)."""
    ok = allowed(tr.strategies)
    return next((c for c in (z, PREREQ.get(z), "anything_else", "close") if c in ok), None) or \
        (rng.choice(ok) if rng else ok[0])


def oracle_policy(tr, scenario, rng=None):
    """The ideal run: it reads hidden facts (eligibility, tier, what is left on the stack) instead of
    guessing; deterministic given the scenario and the dialogue so far. It defines z*."""
    if not tr.strategies:
        return "greet"
    r, tier = scenario["requests"][tr.index], scenario["tier"]
    return _plan(tr, r["kind"], r["concern"], tier, r["kind"] == "buy" or eligible(r, tier),
                 tr.index + 1 < len(scenario["requests"]))


def disclosed_policy(tr, scenario=None, rng=None):
    """The oracle's plan made only from what the dialogue has disclosed (the tracker), never the
    scenario: the best labels a reader of the dialogue can learn. Every fact the oracle uses is told
    before it is needed (the request and its days in the statement, the tier at verify, which the SOP
    puts before any eligibility or voucher step) except one: whether more requests are left. So it
    asks "anything else?" after each settled request, where the oracle closes after the last one."""
    if not tr.strategies:
        return "greet"
    return _plan(tr, tr.kind, tr.concern, tr.tier, tr.eligible() is not False, more=True)


def _plan(tr, kind, concern, tier, eligible_now, more):
    """The oracle's step for the current request, given its kind, concern, the tier, whether it is
    inside the window, and whether more requests are left after it."""
    if tr.no_more or tr.done or (kind == "complaint" and tr.apologised and tier != "Gold"):
        z = "anything_else" if more and not tr.no_more else "close"
    elif kind == "buy":
        z = ("ask_need" if tr.budget is None else
             ("offer_alternative" if tr.sold else "recommend") if tr.liked is None else
             "answer" if concern and not tr.answered else "execute" if tr.confirmed else "confirm")
    elif tr.order is None or not tr.verified:
        z = "ask_order" if tr.order is None else "verify"
    elif kind == "complaint":
        z = "compensate" if tr.apologised else "apologise"
    else:
        z = ("state_policy" if not tr.policy else "answer" if concern and not tr.answered else
             "offer_alternative" if not eligible_now and not tr.alt_ok else
             "execute" if tr.confirmed else "confirm")
    return _first_allowed(z, tr)


DECISION_GROUPS = ("eligibility", "voucher/tier", "request stack", "rest")


def decision_group(tr):
    """Which kind of decision an agent faces at this point of the dialogue (tr: the tracker before
    it). The groups the desk was built around need a fact told turns earlier:
      eligibility    a return / exchange whose terms are stated: confirm it, or offer store credit
                     (days since delivery, in the request, against the tier's window, told at verify);
      voucher/tier   a complaint after the apology: a voucher for Gold members, move on for Standard;
      request stack  a request is settled: "anything else?", or goodbye once the customer has no more;
      rest           everything else (greet, the questions, the steps the last line asks for)."""
    if tr.done or tr.no_more:
        return "request stack"
    if tr.kind == "complaint" and tr.apologised:
        return "voucher/tier"
    if tr.kind in ("return", "exchange") and tr.policy and not tr.alt_ok and not tr.confirmed and \
            (tr.concern is None or tr.answered):
        return "eligibility"
    return "rest"


def read(turns):
    """The tracker before each agent turn of a dialogue's turns, as the rule policies saw it in
    dialogue(): one Tracker, yielded before each agent turn and updated in place after it (read it
    before asking for the next)."""
    tr = Tracker()
    tr.update(None, turns[0]["text"], "disclose")
    for i in range(1, len(turns), 2):
        yield tr
        if i + 1 < len(turns):
            tr.update(turns[i]["strategy"], turns[i + 1]["text"], turns[i + 1]["event"])


def behaviour_policy(tr, scenario, rng, eps=0.05):
    """A typical human agent, sensible on average, with costly habits: names a model before asking the
    budget (40%), confirms before answering a stated concern (50%), confirms a refund without checking
    the window (50%), gives every complainer a voucher (70%), always asks "anything else?"."""
    if not tr.strategies:
        return "greet"
    if rng.random() < eps:
        return rng.choice(allowed(tr.strategies))
    concern = tr.concern and not tr.answered and (tr.last_text in SAY["not_ready"] or rng.random() < 0.5)
    if tr.no_more or tr.done:
        z = "close" if tr.no_more else "anything_else"
    elif tr.kind == "buy":
        z = ("ask_need" if tr.budget is None and tr.liked is None and (tr.prev == "recommend" or rng.random() < 0.6)
             else ("offer_alternative" if tr.sold else "recommend") if tr.liked is None
             else "answer" if concern else "execute" if tr.confirmed else "confirm")
    elif not tr.verified or tr.order is None:
        z = "verify" if not tr.verified else "ask_order"
    elif tr.kind == "complaint":
        z = "apologise" if not tr.apologised else "compensate" if rng.random() < 0.7 else "anything_else"
    else:
        z = ("state_policy" if not tr.policy else "execute" if tr.confirmed else "answer" if concern else
             "offer_alternative" if tr.eligible() is False and not tr.alt_ok and
             tr.last_text not in SAY["refuse_alt"] and rng.random() < 0.5 else "confirm")
    return _first_allowed(z, tr, rng)


def random_policy(tr, scenario, rng):
    """Uniform over the SOP-allowed strategies."""
    return rng.choice(allowed(tr.strategies))


# ---- myopic: the best policy that sees only (previous strategy, the customer's last line verbatim)
TRAIN_SEEDS = 1_000_000     # as in data.py: training scenario seeds are 0 .. 999_999
_MYOPIC = {}


def _table_policy(table, name="myopic_policy"):
    def policy(tr, scenario, rng=None):
        ok = allowed(tr.strategies)    # an unseen key falls back to the ranking of its previous strategy
        return next((z for z in table.get((tr.prev, tr.last_text), []) + table.get(tr.prev, []) if z in ok), ok[0])
    policy.__name__ = name
    return policy


def _step(cust, tr, z, t, rng, paraphrases=PARAPHRASES):
    text = render(z, tr, rng, paraphrases)
    utt, event, done = cust.reply(text, t)
    tr.update(z, utt, event)
    return text, utt, event, done


def _finish(scenario, policy, cust, tr, t, z, horizon, rng):
    """Return of `z` at agent turn t, then `policy`: success, plus a little per request resolved (so a
    failing table still learns which steps make progress)."""
    cust, tr, state = copy.copy(cust), copy.copy(tr), cust.rng.getstate()
    cust.read, cust.st, cust.gate_breaks = list(cust.read), dict(cust.st), list(cust.gate_breaks)
    cust.rng, tr.strategies = random.Random(), list(tr.strategies)
    cust.rng.setstate(state)
    done = False
    while not done and t < horizon:
        done, t = _step(cust, tr, z, t, rng)[3], t + 1
        z = None if done or t >= horizon else policy(tr, scenario, rng)
    return cust.success + 0.1 * (cust.i + cust.st.get("done", False)) / len(cust.reqs)


def fit_myopic(n_scenarios=400, seed=0, horizon=HORIZON, rounds=2, n_branch=120):
    """Monte-Carlo policy iteration over (prev, last line) keys on training scenarios. Start from the
    oracle's majority decision per key; each round, on n_branch scenarios, follow the current table,
    try every allowed strategy at every visited key, finish the dialogue (round 0 with the oracle, as
    a failing table gives no signal; later rounds with the table) and rank the key's strategies by
    mean return. Returns the table ({key: ranked strategies}) that succeeds most often."""
    rng = random.Random(f"myopic/{seed}")
    scenarios = [make_scenario(s, horizon) for s in rng.sample(range(TRAIN_SEEDS), n_scenarios)]
    votes = defaultdict(Counter)
    for sc in scenarios:
        turns, _ = dialogue(sc, oracle_policy, horizon=horizon)
        for i in range(1, len(turns), 2):
            prev = turns[i - 2]["strategy"] if i > 1 else None
            votes[(prev, turns[i - 1]["text"])][turns[i]["strategy"]] += 1
            votes[prev][turns[i]["strategy"]] += 1
    table = {k: [z for z, _ in c.most_common()] for k, c in votes.items()}
    score = lambda tb: sum(play(sc, _table_policy(tb), horizon=horizon)["success"] for sc in scenarios)
    best = (score(table), 0, table)
    for rnd in range(rounds):
        policy, q = (_table_policy(table) if rnd else oracle_policy), defaultdict(lambda: defaultdict(list))
        for sc in scenarios[:n_branch]:
            cust, tr, t, done = Customer(sc), Tracker(), 0, False
            tr.update(None, cust.opening(), "disclose")
            while not done and t < horizon:
                for a in allowed(tr.strategies):
                    ret = _finish(sc, policy, cust, tr, t, a, horizon, rng)
                    q[(tr.prev, tr.last_text)][a].append(ret)
                    q[tr.prev][a].append(ret)
                done, t = _step(cust, tr, policy(tr, sc), t, rng)[3], t + 1
        table = {**table, **{k: sorted(qa, key=lambda a: -sum(qa[a]) / len(qa[a])) for k, qa in q.items()}}
        best = max(best, (score(table), -rnd - 1, table), key=lambda b: b[:2])
    return best[2]


def _myopic(horizon):
    def myopic_policy(tr, scenario, rng=None):
        """The fitted (prev, last line) table; fitted once per horizon, on first use."""
        if horizon not in _MYOPIC:
            _MYOPIC[horizon] = _table_policy(fit_myopic(horizon=horizon))
        return _MYOPIC[horizon](tr, scenario, rng)
    return myopic_policy


myopic_policy = _myopic(HORIZON)
POLICIES = {"oracle": oracle_policy, "disclosed": disclosed_policy, "behaviour": behaviour_policy,
            "random": random_policy, "myopic": myopic_policy}


# ----------------------------------------------------------------------------- whole dialogues
def play(scenario, policy, seed=0, horizon=HORIZON, paraphrases=PARAPHRASES):
    """One dialogue of a rule policy with template text, as a record."""
    turns, cust = dialogue(scenario, policy, seed, horizon, paraphrases)
    return record(scenario, turns, cust, source=f"desk/{policy.__name__}", horizon=horizon)


def dialogue(scenario, policy, seed=0, horizon=HORIZON, paraphrases=PARAPHRASES):
    """The turns of one rule-policy dialogue, and the customer at its end."""
    rng = random.Random(f"policy/{scenario['seed']}/{seed}")
    cust, tr = Customer(scenario, seed), Tracker()
    turns = [{"role": "customer", "text": cust.opening(), "strategy": None, "event": None}]
    tr.update(None, turns[0]["text"], "disclose")
    for t in range(horizon):
        z = policy(tr, scenario, rng)
        assert z in allowed(tr.strategies), (z, tr.strategies)
        text, utt, event, done = _step(cust, tr, z, t, rng, paraphrases)
        turns += [{"role": "agent", "text": text, "strategy": z, "event": None},
                  {"role": "customer", "text": utt, "strategy": None, "event": event}]
        if done:
            break
    return turns, cust


def record(scenario, turns, cust, source, horizon=HORIZON):
    return {"id": f"desk-{scenario['seed']}", "source": source, "scenario": scenario, "turns": turns,
            "success": cust.success, "ref_strategies": reference(scenario, horizon),
            "order_value": cust.order_value(), "sop_ok": cust.sop_ok}


_REF_CACHE = {}


def reference(scenario, horizon=HORIZON):
    """z*: the oracle's strategy sequence (its decisions do not depend on the wording)."""
    key = (scenario["seed"], horizon)
    if key not in _REF_CACHE:
        _REF_CACHE[key] = [t["strategy"] for t in dialogue(scenario, oracle_policy, horizon=horizon)[0]
                           if t["role"] == "agent"]
    return list(_REF_CACHE[key])


def last_line_share(records):
    """Share of the agent decisions in `records` that the best (previous strategy, customer's last line
    verbatim) -> decision table, the majority per key, reproduces. 1.0: the last line decides."""
    votes = defaultdict(Counter)
    for rec in records:
        turns = rec["turns"]
        for i in range(1, len(turns)):
            if turns[i]["role"] == "agent":
                votes[(turns[i - 2]["strategy"] if i > 1 else None, turns[i - 1]["text"])][turns[i]["strategy"]] += 1
    return sum(max(c.values()) for c in votes.values()) / max(1, sum(sum(c.values()) for c in votes.values()))


# ----------------------------------------------------------------------------- knobs
CONTRACT = ["STRATEGIES", "INSTRUCTIONS", "allowed", "SOP", "EVENTS", "SUCCESS_EVENTS", "HORIZON", "PARAPHRASES",
            "make_scenario", "Customer", "recognise", "read_agent_text", "Tracker", "read", "POLICIES",
            "oracle_policy", "disclosed_policy", "DECISION_GROUPS", "decision_group", "behaviour_policy", "random_policy", "myopic_policy", "play", "dialogue", "record", "reference"]


def make_world(horizon=HORIZON, paraphrases=PARAPHRASES):
    """The contract names bound to other knobs; with the defaults it behaves exactly like this module."""
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

"""The desk itself: what it sells and holds (catalogue, orders, return windows), its SOP as an
automaton (`allowed`), the customers it meets (`make_scenario`), and the agent's words: the template
text a rule policy writes (`render`) and the reading of any agent reply's surface
(`read_agent_text`, `recognise`), which the customer, GRE and the tracker all share.

Everything else in the desk stands on this file; it stands on nothing of the desk's.
"""
import random
import re

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


def render(strategy, tracker, rng, paraphrases=PARAPHRASES):
    """Template text for `strategy`, its slots filled from what the tracker read off the dialogue."""
    product, key = tracker.liked or tracker.pick(), strategy
    if strategy == "offer_alternative":
        key, product = key + ("/product" if tracker.kind == "buy" else "/credit"), other_model(tracker.sold or product)
    slots = {"product": product, "sold": tracker.sold or other_model(product), "order": tracker.order or "0000",
             "amount": tracker.amount or 0, "fact": FACTS[tracker.concern or "delivery"]}
    slots["thing"] = f"the {product}" if tracker.kind == "buy" else f"order #{slots['order']}"
    if strategy in ("confirm", "execute"):
        action = "buy" if tracker.kind == "buy" else "credit" if tracker.alt_ok else \
            "exchange" if tracker.kind == "exchange" else "refund"
        slots["action"] = ACTIONS[action][strategy == "execute"].format(**slots)
    return rng.choice(PARAPHRASE_BANK[key][:paraphrases]).format(**slots)

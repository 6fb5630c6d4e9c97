"""The built-in world: a small e-commerce shop, a rule-based customer simulator and three policies.

Everything is seeded and offline. One *scenario* = one customer with a hidden goal:
    category, feature (the must-have; it picks exactly one product of the category), budget,
    concern (what stops them buying once the right product is named: "price" | "doubt" |
    "question" | None), upsell_open, patience, says_category (whether they name the category
    when greeted).

The simulator reads the agent's *text*, not its strategy label: `read_agent_text` recognises the
act (and any product named) from surface cues, so a CS Agent that writes the wrong thing gets the
reaction to what it wrote. Its reply is a templated utterance plus one engagement event.

Why planning matters here (every rule below is deterministic given the scenario):
  - recommending before the must-have is disclosed usually names the wrong product: the customer
    corrects you (negative) and loses patience;
  - a price objection is fixed by a discount; arguing value (handle_objection) does not;
    a doubt is fixed by handle_objection; a question by answer;
  - a discount nobody asked for costs 10% of the order value and a turn;
  - asking for the order while a concern is open costs 2 patience (pushing too soon loses sales);
  - upselling someone who did not ask for more costs 2 patience and can lose the sale in the cart;
  - patience 0 -> the customer leaves. Only `close` after `add_to_cart` is a purchase.
Customer reactions reveal what the hidden goal implied (objection text, "anything that goes with
it?"), so a policy that reads the history carefully can match the oracle.
"""
import random
import re

# ----------------------------------------------------------------------------- catalogue
CATALOGUE = {  # category -> [(product name, must-have feature, price)]; each feature names one product
    "laptop": [("Aero", "lightweight", 899), ("Titan", "gaming", 1499),
               ("Nova", "battery", 1099), ("Flex", "touchscreen", 999)],
    "phone": [("Lumo", "selfie", 799), ("Volt", "durable", 599),
              ("Mini", "compact", 499), ("Vault", "storage", 899)],
    "headphones": [("Echo", "wireless", 149), ("Calm", "quiet", 299),
                   ("Boom", "bass", 129), ("Fold", "foldable", 99)],
    "camera": [("Zoomer", "zoom", 649), ("Aqua", "underwater", 399),
               ("Snap", "pocket", 349), ("Reel", "video", 799)],
}
PRODUCTS = {name: (cat, feat, price) for cat, items in CATALOGUE.items() for name, feat, price in items}
PLAN_SHARE = 0.1          # the protection plan an upsell adds, as a share of the product price
DISCOUNT = 0.1

# ----------------------------------------------------------------------------- SOP
STRATEGIES = ["greet", "elicit_need", "recommend", "answer", "handle_objection",
              "offer_discount", "upsell", "confirm_order", "close"]
INSTRUCTIONS = {  # the CS Agent's one-line instruction per strategy (short: it is in every turn)
    "greet": "say hello",
    "elicit_need": "ask what they need",
    "recommend": "name the product that fits",
    "answer": "answer their question",
    "handle_objection": "reassure them",
    "offer_discount": "offer a discount",
    "upsell": "offer the protection plan",
    "confirm_order": "ask to place the order",
    "close": "thank them and say goodbye",
}
START = "<start>"
SOP = {  # previous strategy -> strategies allowed next (hard constraints)
    START: ["greet"],
    "greet": ["elicit_need", "recommend"],
    "elicit_need": ["elicit_need", "recommend"],
    "recommend": ["recommend", "elicit_need", "answer", "handle_objection", "offer_discount",
                  "confirm_order", "close"],
    "answer": ["recommend", "answer", "handle_objection", "offer_discount", "confirm_order",
               "upsell", "close"],
    "handle_objection": ["recommend", "answer", "offer_discount", "confirm_order", "close"],
    "offer_discount": ["recommend", "answer", "handle_objection", "confirm_order", "close"],
    "confirm_order": ["recommend", "answer", "handle_objection", "offer_discount", "upsell", "close"],
    "upsell": ["answer", "close"],
    "close": [],
}
EVENTS = ["disclose", "positive", "neutral", "negative", "objection", "ask", "add_to_cart",
          "purchase", "leave"]
SUCCESS_EVENTS = ("purchase",)
HORIZON = 10  # max agent turns


def allowed(strategies):
    """A(h_t): the strategies the SOP allows after the strategies chosen so far ([] at the first
    turn). Here only the previous one matters (the SOP table); the desk's gates read the whole
    history. [] (after `close`): the dialogue ends."""
    return SOP[strategies[-1] if strategies else START]


# ----------------------------------------------------------------------------- scenarios
def make_scenario(seed):
    """The hidden goal of customer `seed` (deterministic)."""
    rng = random.Random(seed)
    category = rng.choice(sorted(CATALOGUE))
    name, feature, price = rng.choice(CATALOGUE[category])
    concern = rng.choice(["price", "doubt", "question", None])
    # price concern: the product is over budget, and a 10% discount brings it under
    budget = int(price * 0.95) if concern == "price" else int(price * rng.uniform(1.0, 1.3))
    return {"seed": seed, "category": category, "feature": feature, "target": name,
            "budget": budget, "concern": concern, "upsell_open": rng.random() < 0.5,
            "patience": rng.choice([3, 4]), "says_category": rng.random() < 0.5}


# ----------------------------------------------------------------------------- agent text
AGENT_TEMPLATES = {
    "greet": ["Hello and welcome to our shop!", "Hi there, welcome!", "Welcome, good to see you!"],
    "elicit_need": ["What are you looking for today?", "What kind of product do you need?"],
    "elicit_feature": ["What matters most to you in a {category}?",
                       "Which feature do you need in your {category}?"],
    "recommend": ["For {feature}, I recommend the {name} {category}.",
                  "For {feature}, you will love the {name} {category}."],
    "recommend_blind": ["How about the {name} {category}?", "Maybe the {name} {category} suits you?"],
    "answer": ["Yes, it has a two year warranty and free delivery.",
               "Good question: delivery is free and the warranty is two years."],
    "handle_objection": ["I understand, but it is worth every cent.",
                         "Our customers love it, it is really worth it."],
    "offer_discount": ["I can give you 10% off today.", "Let me offer you a 10% discount."],
    "upsell": ["Would you like to add our protection plan?",
               "May I add the protection plan to keep it safe?"],
    "confirm_order": ["Shall I place the order for you?", "Ready to place your order?"],
    "close": ["Thank you for shopping with us, goodbye!", "Thanks for your purchase, goodbye!"],
}


def render_agent(strategy, known, rng):
    """Template text for `strategy` given what the agent knows ({"category", "feature"} or None).

    This is the "human CS agent" of the logs: it names the best product it can infer, picking at
    random where the need is not yet known. `known["target"]` (oracle only) overrides the guess.
    """
    if strategy == "elicit_need" and known.get("category"):
        return rng.choice(AGENT_TEMPLATES["elicit_feature"]).format(category=known["category"])
    if strategy == "recommend":
        name = known.get("target") or guess_product(known, rng)
        cat, feat, _ = PRODUCTS[name]
        key = "recommend" if known.get("feature") or known.get("target") else "recommend_blind"
        return rng.choice(AGENT_TEMPLATES[key]).format(name=name, category=cat, feature=feat)
    return rng.choice(AGENT_TEMPLATES[strategy])


def guess_product(known, rng):
    cats = [known["category"]] if known.get("category") else sorted(CATALOGUE)
    options = [n for c in cats for n, f, _ in CATALOGUE[c] if known.get("feature") in (None, f)]
    return rng.choice(options or [n for c in cats for n, _, _ in CATALOGUE[c]])


_PRODUCT_RE = re.compile(r"\b(" + "|".join(PRODUCTS) + r")\b")
_CUES = [  # (strategy, regex): first match wins, most specific first
    ("close", r"goodbye|\bbye\b"),
    ("upsell", r"protection plan"),
    ("offer_discount", r"discount|% off"),
    ("confirm_order", r"place (the|your) order"),
    ("handle_objection", r"worth"),
    ("answer", r"warranty"),
    ("recommend", _PRODUCT_RE.pattern),
    ("elicit_need", r"\?"),
    ("greet", r"welcome|\bhello\b|\bhi\b"),
]


def read_agent_text(text):
    """Recognise (strategy or None, product named or None) from an agent reply's surface cues.

    This is the simulator's reading and the strategy recogniser behind GRE.
    """
    low = text.lower()
    m = _PRODUCT_RE.search(text)
    for strategy, pattern in _CUES:
        if re.search(pattern, text if strategy == "recommend" else low):
            return strategy, (m.group(1) if m else None)
    return None, (m.group(1) if m else None)


def recognise(text):
    return read_agent_text(text)[0]


# ----------------------------------------------------------------------------- customer simulator
CUSTOMER_TEMPLATES = {
    "open": ["Hi.", "Hello.", "Good morning."],
    "greet_cat": ["Hi, I want to buy a {category}.", "Hello, I am looking for a {category}."],
    "greet_vague": ["Hello, I need some advice.", "Hi, can you help me find something?"],
    "say_cat": ["I am looking for a {category}.", "I want a new {category}."],
    "say_feat": ["It must have {feature}.", "I really need {feature}."],  # the need ends the turn
    "told": ["I already told you what I need.", "Like I said before."],
    "wrong_cat": ["That is not a {category}, which is what I want."],
    "wrong_feat": ["Hmm, no. My {category} must have {feature}.",
                   "No, for my {category} I need {feature}."],
    "liked": ["That sounds perfect.", "Nice, I like it."],
    "price": ["I like it, but it is over my budget.", "It is a bit too expensive for me."],
    "doubt": ["Hmm, I am not sure it is worth it.", "I have doubts about it."],
    "question": ["Does it come with a warranty?", "What about delivery and warranty?"],
    "still_price": ["I still cannot afford it.", "It is still too expensive."],
    "resolved": ["OK, that settles it.", "Great, that helps."],
    "meh": ["OK.", "I see."],
    "discount_what": ["A discount on what?"],
    "not_ready": ["I am not ready to buy yet.", "Wait, I am not convinced yet."],
    "cart_open": ["Yes, add it to my cart. Anything that goes with it?",
                  "Great, I will take it. Do you have extras for it?"],
    "cart_closed": ["Yes, add it to my cart. That is all I need.",
                    "Great, I will take it, nothing else."],
    "plan_yes": ["Sure, add the plan too."],
    "plan_no": ["No, I do not want extras.", "Please stop pushing extras."],
    "confused": ["Sorry, what do you mean?", "I do not follow."],
    "bye_buy": ["Thanks, bye!"],
    "bye_leave": ["Never mind, goodbye.", "I will look elsewhere."],
}


class Customer:
    """Rule-based customer. `reply(agent_text)` -> (utterance, event, done)."""

    def __init__(self, scenario, seed=0):
        self.s = scenario
        self.rng = random.Random(f"{scenario['seed']}/{seed}")  # templates only; rules are exact
        self.patience = scenario["patience"]
        self.knows_cat = False       # what the customer has disclosed so far
        self.knows_feat = False
        self.liked = False           # the right product was named
        self.pending = None          # open concern after the right product was named
        self.in_cart = False
        self.plan = False
        self.discount = False
        self.success = False

    def say(self, key):
        return self.rng.choice(CUSTOMER_TEMPLATES[key]).format(**self.s)

    def opening(self):
        return self.say("open")

    def reply(self, text, turn):
        """React to the agent's reply at agent turn `turn` (0-based)."""
        act, product = read_agent_text(text)
        s, cost, out = self.s, 0, None
        if act == "greet":
            if turn == 0 and s["says_category"]:
                self.knows_cat = True
                out = (self.say("greet_cat"), "disclose")
            else:
                out, cost = (self.say("greet_vague"), "positive"), (0 if turn == 0 else 1)
        elif act == "elicit_need":
            if not self.knows_cat:
                self.knows_cat = True
                out = (self.say("say_cat"), "disclose")
            elif not self.knows_feat:
                self.knows_feat = True
                out = (self.say("say_feat"), "disclose")
            else:
                out, cost = (self.say("told"), "negative"), 1
        elif act == "recommend" and product is not None:
            cat, feat, price = PRODUCTS[product]
            if cat != s["category"]:
                self.knows_cat = True
                out, cost = (self.say("wrong_cat"), "negative"), 1
            elif feat != s["feature"]:
                self.knows_cat = self.knows_feat = True
                out, cost = (self.say("wrong_feat"), "negative"), 1
            elif self.liked:
                out = (self.say("meh"), "neutral")
            else:
                self.liked = True
                self.pending = s["concern"] if not (s["concern"] == "price" and self.discount) else None
                out = (self.say(self.pending), "ask" if self.pending == "question" else "objection") \
                    if self.pending else (self.say("liked"), "positive")
        elif act == "offer_discount":
            if not self.liked:
                out, cost = (self.say("discount_what"), "neutral"), 1
            else:
                self.discount = True
                if self.pending in ("price", "doubt"):  # money also soothes a doubt, at a cost
                    self.pending = None
                    out = (self.say("resolved"), "positive")
                else:
                    out = (self.say("meh"), "neutral")
        elif act == "handle_objection":
            if self.pending == "doubt":
                self.pending = None
                out = (self.say("resolved"), "positive")
            elif self.pending == "price":
                out, cost = (self.say("still_price"), "negative"), 1
            else:
                out, cost = (self.say("meh"), "neutral"), 1
        elif act == "answer":
            if self.pending == "question":
                self.pending = None
                out = (self.say("resolved"), "positive")
            else:
                out, cost = (self.say("meh"), "neutral"), 1
        elif act == "confirm_order":
            if self.liked and self.pending is None and not self.in_cart:
                self.in_cart = True
                out = (self.say("cart_open" if s["upsell_open"] else "cart_closed"), "add_to_cart")
            else:
                out, cost = (self.say("not_ready"), "negative"), 2
        elif act == "upsell":
            if self.in_cart and s["upsell_open"] and not self.plan:
                self.plan = True
                out = (self.say("plan_yes"), "positive")
            else:
                out, cost = (self.say("plan_no"), "negative"), 2
        elif act == "close":
            if self.in_cart:
                self.success = True
                return self.say("bye_buy"), "purchase", True
            return self.say("bye_leave"), "leave", True
        else:
            out, cost = (self.say("confused"), "neutral"), 1
        self.patience -= cost
        if self.patience <= 0:
            return self.say("bye_leave"), "leave", True
        return out[0], out[1], False

    def order_value(self):
        if not self.success:
            return 0.0
        price = PRODUCTS[self.s["target"]][2]
        return price * (1 - DISCOUNT * self.discount) + price * PLAN_SHARE * self.plan


# ----------------------------------------------------------------------------- policies
# Each policy sees only what a human agent would (the dialogue so far, summarised by `Tracker`),
# except the oracle, which also sees the hidden goal. All return one SOP-allowed strategy.
class Tracker:
    """What an agent can read off the dialogue: disclosed need, the customer's last event/text."""

    def __init__(self):
        self.known = {"category": None, "feature": None}
        self.prev = None
        self.strategies = []
        self.last_event = None
        self.last_text = ""
        self.recommended = False
        self.in_cart = False

    def update(self, strategy, customer_text, event):
        self.prev, self.last_event, self.last_text = strategy, event, customer_text
        self.strategies.append(strategy)
        for cat, items in CATALOGUE.items():
            if re.search(rf"\b{cat}\b", customer_text):
                self.known["category"] = cat
            for _, feat, _ in items:
                if self.known["category"] == cat and feat in customer_text:
                    self.known["feature"] = feat
        self.recommended |= strategy == "recommend" and event in ("positive", "objection", "ask")
        self.in_cart |= event == "add_to_cart"


def read(turns):
    """The tracker before each agent turn of a dialogue's turns, as the rule policies saw it in
    dialogue() (the opening is not read): one Tracker, yielded before each agent turn and updated in
    place after it."""
    tracker = Tracker()
    for i in range(1, len(turns), 2):
        yield tracker
        if i + 1 < len(turns):
            tracker.update(turns[i]["strategy"], turns[i + 1]["text"], turns[i + 1]["event"])


def oracle_policy(tracker, scenario, rng):
    """A clairvoyant rule policy (it reads the hidden concern and whether an upsell is open): it
    defines z*. It is not an upper bound on TSE: it upsells every open customer, an extra turn for
    order value, so a learnt Expert can end above it."""
    if tracker.prev is None:
        return "greet"
    if tracker.in_cart:
        return "upsell" if scenario["upsell_open"] and tracker.prev != "upsell" else "close"
    if tracker.known["feature"] is None:
        return "elicit_need"
    if not tracker.recommended:
        return "recommend"
    if tracker.last_event in ("objection", "ask"):
        return {"price": "offer_discount", "doubt": "handle_objection",
                "question": "answer"}[scenario["concern"]]
    return "confirm_order"


def behaviour_policy(tracker, scenario, rng, eps=0.1):
    """A typical human agent: sensible on average, with habits that cost sales.

    Habits: recommends as soon as the category is known (40%), argues value against price
    objections, sweetens accepted deals with a discount, upsells everyone, pushes to close.
    """
    if tracker.prev is not None and rng.random() < eps:
        return rng.choice(allowed(tracker.strategies))
    def pick(options):  # [(strategy, weight)] restricted to the SOP
        options = [(z, w) for z, w in options if z in allowed(tracker.strategies)] or \
            [(z, 1.0) for z in allowed(tracker.strategies)]
        return rng.choices([z for z, _ in options], [w for _, w in options])[0]
    if tracker.prev is None:
        return "greet"
    if tracker.in_cart:
        return "close" if tracker.prev == "upsell" else pick([("upsell", 0.65), ("close", 0.35)])
    if tracker.known["category"] is None:
        return pick([("elicit_need", 0.85), ("recommend", 0.15)])
    if tracker.known["feature"] is None:
        return pick([("recommend", 0.6), ("elicit_need", 0.4)])
    if not tracker.recommended:
        return "recommend"
    if re.search(r"budget|expensive|afford", tracker.last_text):
        return pick([("handle_objection", 0.5), ("offer_discount", 0.3), ("confirm_order", 0.2)])
    if tracker.last_event == "objection":
        return pick([("handle_objection", 0.6), ("offer_discount", 0.3), ("confirm_order", 0.1)])
    if tracker.last_event == "ask":
        return pick([("answer", 0.6), ("confirm_order", 0.25), ("handle_objection", 0.15)])
    return pick([("confirm_order", 0.6), ("offer_discount", 0.4)])


def random_policy(tracker, scenario, rng):
    """Uniform over the SOP-allowed strategies."""
    return rng.choice(allowed(tracker.strategies))


POLICIES = {"oracle": oracle_policy, "behaviour": behaviour_policy, "random": random_policy}


# ----------------------------------------------------------------------------- whole dialogues
def play(scenario, policy, seed=0, horizon=HORIZON):
    """One dialogue of a rule policy with template text (the logs, the oracle and random rows)."""
    turns, cust = dialogue(scenario, policy, seed, horizon)
    return record(scenario, turns, cust, source=f"shop/{policy.__name__}")


def dialogue(scenario, policy, seed=0, horizon=HORIZON):
    """The turns of one rule-policy dialogue, and the customer at its end."""
    rng = random.Random(f"policy/{scenario['seed']}/{seed}")
    cust, tracker = Customer(scenario, seed), Tracker()
    turns = [{"role": "customer", "text": cust.opening(), "strategy": None, "event": None}]
    for t in range(horizon):
        z = policy(tracker, scenario, rng)
        assert z in allowed(tracker.strategies), (z, tracker.strategies)
        known = dict(tracker.known, target=scenario["target"]) if policy is oracle_policy else tracker.known
        text = render_agent(z, known, rng)
        turns.append({"role": "agent", "text": text, "strategy": z, "event": None})
        utt, event, done = cust.reply(text, t)
        turns.append({"role": "customer", "text": utt, "strategy": None, "event": event})
        tracker.update(z, utt, event)
        if done:
            break
    return turns, cust


def record(scenario, turns, cust, source):
    return {"id": f"shop-{scenario['seed']}", "source": source, "scenario": scenario,
            "turns": turns, "success": cust.success, "ref_strategies": reference(scenario),
            "order_value": cust.order_value()}


_REF_CACHE = {}


def reference(scenario):
    """z*: the oracle's strategy sequence for this scenario (its events do not depend on templates)."""
    key = scenario["seed"]
    if key not in _REF_CACHE:
        turns, _ = dialogue(scenario, oracle_policy)
        _REF_CACHE[key] = [t["strategy"] for t in turns if t["role"] == "agent"]
    return list(_REF_CACHE[key])

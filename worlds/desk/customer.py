"""The customer simulator: a rule-based customer with a stack of 1-3 requests who reads the agent's
*text* (catalogue.read_agent_text), never its strategy, and answers with a templated line (SAY) and
one engagement event. Its rules are exact given the scenario; only the wording is random.
"""
import random

from .catalogue import (ORDERS, PRODUCTS, QUESTION, RETAIN, UNREAD, VOUCHER, WRONG, allowed, eligible,
                        other_model, read_agent_text)

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

"""Fuzz the customer simulator with arbitrary agent text: it must never raise, and must always answer
(utterance, event, done) with a known event, over random scenarios and random turn indices.

A trained CS Agent can write anything (empty replies, runaway 10k-character strings, stray special
tokens, bytes that decode to control characters), and `shop.Customer.reply`, `shop.read_agent_text`
and `shop.recognise` read that text directly. Seeded and plain `random`: a failure names its case
number and the exact text, so it reproduces.
"""
import random
import string
from collections import Counter

from worlds import shop

N_CASES = 2000
MAX_REPLIES = 40   # a customer may never finish (re-naming the liked product costs no patience)

PRODUCT_NAMES = sorted(shop.PRODUCTS)
CUE_WORDS = ["goodbye", "bye", "protection plan", "discount", "10% off", "% off", "place the order",
             "place your order", "worth", "warranty", "?", "welcome", "hello", "hi", "Hello", "HI",
             "BYE", "Goodbye!", "worthless", "hint", "byebye", "byte"]
WORDS = [*PRODUCT_NAMES, *(n.lower() for n in PRODUCT_NAMES), *(n.upper() for n in PRODUCT_NAMES),
         *shop.CATALOGUE, *(f for items in shop.CATALOGUE.values() for _, f, _ in items),
         *CUE_WORDS, *(f"<|strategy:{z}|>" for z in shop.STRATEGIES), "<|strategy:nope|>", "<|eot|>",
         "<|bos|>", "<|pad|>", "A:", "C:", "{name}", "{category}", "{", "}", "%s", "%(x)s"]
REGEX_META = [".*", "(", ")", "[", "]", "[^", "\\", "\\b", "\\1", "(?P<x>", "|", "^", "$", "+", "*?",
              "{2,", "(?=", "(?<!", "\\u", "\\x00", "(((((", "]]]]"]
UNICODE = ["é", "ß", "İ", "ﬁ", "Σ", "ς", "\u0301", "日本語", "🙂", "👍🏽", "👨‍👩‍👧", "\u200b", "\u200e",
           "\ufeff", "\u2028", "\u2029", "\ud800", "\udfff", "\U0010ffff", "Ａｅｒｏ", "𝐀𝐞𝐫𝐨"]
CONTROL = [chr(c) for c in range(32)] + ["\x7f", "\x85", "\x9b"]


def random_text(rng):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(["", " ", "\n", "\t", "\r\n", " \t\n\x0b\x0c\r ", "\u00a0", "\u3000"])
    if kind == 1:   # very long: 10k characters of cue-laden noise or of one character
        if rng.random() < 0.5:
            return rng.choice(["a", "?", " ", "🙂", "("]) * 10_000
        return "".join(rng.choice(WORDS + [" "] * 5) for _ in range(4000))[:10_000]
    if kind == 2:
        return "".join(rng.choice(UNICODE) for _ in range(rng.randrange(1, 30)))
    if kind == 3:
        return "".join(rng.choice(CONTROL + [" ", "a", "?"]) for _ in range(rng.randrange(1, 50)))
    if kind == 4:
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 200)))
    if kind == 5:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 60)))
    if kind == 6:
        return "".join(rng.choice(REGEX_META + WORDS) for _ in range(rng.randrange(1, 20)))
    if kind == 7:   # a plausible reply: a template with a random product
        return random_text_template(rng)
    if kind == 8:   # several templates glued together (an agent that performs many acts at once)
        return " ".join(random_text_template(rng) for _ in range(rng.randrange(2, 5)))
    # kinds 9-11: product names, cue words, strategy tokens and noise mixed at random
    sep = rng.choice([" ", "", "\n", ", ", "\x00", "🙂", "."])
    return sep.join(rng.choice(WORDS + REGEX_META + UNICODE + CONTROL) for _ in range(rng.randrange(1, 25)))


def random_text_template(rng):
    z = rng.choice(list(shop.AGENT_TEMPLATES))
    name = rng.choice(PRODUCT_NAMES)
    cat, feat, _ = shop.PRODUCTS[name]
    return rng.choice(shop.AGENT_TEMPLATES[z]).format(name=name, category=cat, feature=feat)


def check_reading(text, where):
    strategy, product = shop.read_agent_text(text)
    assert strategy is None or strategy in shop.STRATEGIES, (where, strategy)
    assert product is None or product in shop.PRODUCTS, (where, product)
    assert shop.recognise(text) in (*shop.STRATEGIES, None), where


# the template banks that are not named after the strategy they carry out (render_agent)
TEMPLATE_STRATEGY = {"elicit_feature": "elicit_need", "recommend_blind": "recommend"}


def test_every_template_for_every_product_is_read_as_its_own_strategy():
    """Each of the shop's agent templates, filled in with every product (its name, category and
    must-have), is read back by the simulator (read_agent_text) and by the GRE recogniser
    (recognise) as the strategy it was written for, and a template that names a product is read as
    naming that product (the customer reacts to the product it heard). The fuzz above only checks
    that the reading is *some* label; this checks it is the right one."""
    assert set(TEMPLATE_STRATEGY.values()) | set(shop.AGENT_TEMPLATES) - set(TEMPLATE_STRATEGY) == set(shop.STRATEGIES)
    checked = 0
    for key, bank in shop.AGENT_TEMPLATES.items():
        z = TEMPLATE_STRATEGY.get(key, key)
        for template in bank:
            for name in PRODUCT_NAMES:
                cat, feat, _ = shop.PRODUCTS[name]
                text = template.format(name=name, category=cat, feature=feat)
                named = name if "{name}" in template else None
                assert shop.read_agent_text(text) == (z, named), (key, text, shop.read_agent_text(text))
                assert shop.recognise(text) == z, (key, text)
                checked += 1
    assert checked == len(PRODUCT_NAMES) * sum(len(b) for b in shop.AGENT_TEMPLATES.values())


def test_customer_reply_never_raises_on_arbitrary_text():
    rng = random.Random(20240611)
    replies = finished = 0
    events = Counter()
    for case in range(N_CASES):
        seed = rng.randrange(2_000_000)   # train and held-out seed ranges alike
        scenario = shop.make_scenario(seed)
        cust = shop.Customer(scenario, seed=rng.randrange(1000))
        opening = cust.opening()
        assert isinstance(opening, str) and opening, (case, seed)
        # pure noise reaches only the first states (the customer leaves); so in most cases the fuzz
        # text is interleaved with the oracle's own replies, which walk the customer to the deeper
        # states (product liked, concern open, item in the cart) where the noise then lands
        guide, tracker = rng.choice([0.0, 0.6, 0.85]), shop.Tracker()
        for n in range(MAX_REPLIES):
            if rng.random() < guide:
                z = shop.oracle_policy(tracker, scenario, rng)
                text = shop.render_agent(z, dict(tracker.known, target=scenario["target"]), rng)
                if rng.random() < 0.2:   # a right reply with junk around it
                    text = rng.choice([text + " " + random_text(rng), random_text(rng) + text])
            else:
                text = random_text(rng)
            # sequential turns most of the time, otherwise any index (0 again, or far past the horizon)
            turn = n if rng.random() < 0.6 else rng.randrange(0, 3 * shop.HORIZON)
            where = (case, seed, n, turn, text[:300])
            check_reading(text, where)
            try:
                out = cust.reply(text, turn)
            except Exception as e:  # noqa: BLE001 - report the case that broke it
                raise AssertionError(f"Customer.reply raised {e!r} on case {where!r}") from e
            replies += 1
            assert isinstance(out, tuple) and len(out) == 3, (where, out)
            utterance, event, done = out
            assert isinstance(utterance, str) and utterance.strip(), (where, out)
            assert event in shop.EVENTS, (where, out)
            assert isinstance(done, bool), (where, out)
            events[event] += 1
            tracker.update(shop.recognise(text), utterance, event)
            if done:   # the dialogue is over: stop talking to this customer
                assert event in ("purchase", "leave"), (where, out)
                assert cust.success == (event == "purchase"), (where, out)
                finished += 1
                break
            assert event not in ("purchase", "leave"), (where, out)
        value = cust.order_value()
        assert isinstance(value, float) and value >= 0.0 and (value > 0) == cust.success, (case, value)
    # the fuzz reached every kind of reaction, purchases included, and most customers finished
    assert set(events) == set(shop.EVENTS), events
    assert replies > N_CASES and finished > N_CASES // 2, (replies, finished)


def test_read_agent_text_never_raises_and_returns_known_labels():
    rng = random.Random(7)
    seen = set()
    for case in range(N_CASES):
        text = random_text(rng)
        check_reading(text, (case, text[:300]))
        seen.add(shop.recognise(text))
    # the fuzz corpus reaches every strategy and the "no act recognised" answer
    assert seen == set(shop.STRATEGIES) | {None}, seen

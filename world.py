"""The world contract: what GOPO trains against. To take GOPO to your own domain, write a module
that provides these names (shop.py is the small example, desk.py the long-horizon one, realdata/logged.py
builds one from real logs), and pass it where `shop` or `desk` is passed.

  STRATEGIES             strategy names: the Expert's action space (one new token each)
  INSTRUCTIONS           strategy -> one short line the CS Agent follows (it is in every turn)
  allowed(strategies)    the SOP as an automaton: the strategies allowed now, given those chosen so far
                         in this dialogue ([] at the first agent turn). [] ends the dialogue. The Expert's
                         mask in sampling, greedy decoding, SFT and scoring is exactly this set.
  SOP                    the hard rules, for people (shop: the previous-strategy table allowed() reads)
  EVENTS, SUCCESS_EVENTS engagement events a customer turn carries ("leave" among them); the successes
  HORIZON                maximum agent turns
  make_scenario(seed)    a deterministic hidden goal, a JSON-able dict with a "seed" key
  Customer(scenario, seed)  .opening() -> first utterance; .reply(text, turn) -> (utterance, event, done);
                         .success; .order_value() (business value, 0 on failure)
  recognise(text)        the strategy a reply carries out, read off its surface (or None): the
                         simulator's reading, GRE and sop_ok
  Tracker                what an agent can read off the dialogue; rule policies see it, and it exposes
                         at least .prev (previous strategy), .strategies (all so far), .last_text
  POLICIES               rule policies policy(tr, scenario, rng) -> strategy: "oracle" (sees the hidden
                         goal; defines z*), "behaviour" (writes the training logs), "random", and where
                         it makes sense "myopic" (the best policy that reads only the last line)
  play(scenario, policy, seed=0) -> record; dialogue(...) -> (turns, customer);
  record(scenario, turns, customer, source) -> {"id", "source", "scenario", "turns", "success",
                         "ref_strategies", "order_value"}; reference(scenario) -> z*

Held-out scenarios come from seeds training never samples (data.test_seeds).
"""
WORLDS = ("shop", "desk")


def load(name, horizon=None, paraphrases=None):
    """A built-in world by name, with its knobs (desk only: maximum agent turns, paraphrases per
    strategy; None keeps the world's defaults)."""
    if name == "shop":
        if horizon is not None or paraphrases is not None:
            raise ValueError("--horizon and --paraphrases are knobs of the desk world (--world desk)")
        import shop
        return shop
    if name == "desk":
        import desk
        knobs = (horizon or desk.HORIZON, paraphrases or desk.PARAPHRASES)
        return desk if knobs == (desk.HORIZON, desk.PARAPHRASES) else desk.make_world(*knobs)
    raise ValueError(f"unknown world {name!r} (built-in: {', '.join(WORLDS)})")

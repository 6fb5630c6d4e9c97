"""The desk's world card: `python -m worlds.desk` prints each rule policy's success, TSE, turns,
sop_ok and order value on 1,000 held-out scenarios, the last-line share against the shop's, and the
decision groups (docs/design.md quotes it).

It lives beside the world, not in it: the card reads the world as a user does (data's seed ranges,
tse's metrics, the shop to compare, worlds.decision_accuracy), and the world itself needs none of them.
"""
import data
import tse
import worlds
from worlds import desk, shop


def card(n=1000):
    """Each rule policy's success, TSE and turns on n held-out scenarios, and the last-line share."""
    logs = [desk.play(desk.make_scenario(s), desk.behaviour_policy) for s in data.train_seeds(1000)]
    values, mean = tse.event_values(logs, desk.SUCCESS_EVENTS), lambda xs: sum(xs) / len(xs)
    scenarios, recs = [desk.make_scenario(s) for s in data.test_seeds(n)], {}
    print(f"desk world card: {n} held-out scenarios (data.test_seeds), event values from 1000 behaviour logs")
    print(f"{'policy':10s} {'success':>8s} {'tse':>6s} {'turns':>6s} {'sop_ok':>7s} {'value':>7s}")
    for name, policy in desk.POLICIES.items():
        recs[name] = [desk.play(sc, policy) for sc in scenarios]
        m = [tse.trajectory_metrics(r, values, desk.HORIZON) for r in recs[name]]
        print(f"{name:10s} {mean([x['success'] for x in m]):8.3f} {mean([x['tse'] for x in m]):6.3f} "
              f"{mean([x['turns'] for x in m]):6.2f} {mean([r['sop_ok'] for r in recs[name]]):7.3f} "
              f"{mean([r['order_value'] for r in recs[name]]):7.1f}")
    shop_recs = [shop.play(shop.make_scenario(s), shop.oracle_policy) for s in data.test_seeds(n)]
    print(f"last-line key share of oracle decisions: desk {desk.last_line_share(recs['oracle']):.3f}, "
          f"shop {desk.last_line_share(shop_recs):.3f} (best (prev strategy, last line) -> decision table)")
    print(f"longest oracle dialogue: {max(sum(len(t['text']) for t in r['turns']) for r in recs['oracle'])} "
          f"chars, {max(len(r['ref_strategies']) for r in recs['oracle'])} agent turns; "
          f"knobs: HORIZON={desk.HORIZON} PARAPHRASES={desk.PARAPHRASES} (make_world(horizon, paraphrases))")
    for name in ("behaviour", "oracle"):
        acc = worlds.decision_accuracy(desk, recs[name])
        print(f"decision groups in the {name}'s dialogues: share of decisions (accuracy against the disclosed "
              f"policy): " + ", ".join(f"{g} {n / acc['all'][1]:.3f} ({c / max(n, 1):.2f})"
                                       for g, (c, n) in acc.items() if g != "all"))
    print("example oracle dialogue:")
    for t in recs["oracle"][1]["turns"]:
        print(f"  {t['role']:8s} [{t['strategy'] or t['event'] or '':17s}] {t['text']}")


if __name__ == "__main__":
    card()

"""Evaluation metrics for GOPO: TSE, ESNDCG, generation reward, BLEU / ROUGE-L, and confidence intervals.

TSE (Task-focused Sequential Engagement) scores *how* a dialogue moves the customer toward the goal:
every agent turn gets the value of the engagement event it caused, where an event's value is how
often dialogues containing it end in task success (learned from logs by `event_values`). ESNDCG
scores how closely a predicted strategy sequence follows an expert reference. Everything here is
pure python on plain lists; nothing depends on the rest of the repo.
"""
import math
import random
import statistics
from collections import Counter


# ----------------------------------------------------------------------------- event values and TSE

def event_values(dialogues, success_events=("purchase",)):
    """Value of each engagement event, learned from a log of dialogue records.

    v(e) = (n_success_with_e + 1) / (n_with_e + 2), where n_with_e is the number of dialogues in which
    event e occurs (counted once per dialogue, however often it occurs) and n_success_with_e is how
    many of those have rec["success"] True. Events are read from customer turns; None is skipped.
    Every event in `success_events` gets value 1.0, whether or not it occurs in the log.
    """
    n_with, n_success = Counter(), Counter()
    for rec in dialogues:
        events = {t["event"] for t in rec["turns"] if t["role"] == "customer" and t["event"] is not None}
        for e in events:
            n_with[e] += 1
            n_success[e] += bool(rec["success"])
    # Laplace smoothing: an event seen once is pulled toward 1/2 instead of jumping to 0 or 1
    values = {e: (n_success[e] + 1) / (n_with[e] + 2) for e in sorted(n_with)}   # sorted: values.json the same every run
    for e in success_events:
        values[e] = 1.0  # the success event *is* the goal, by definition worth 1
    return values


def tse(events, success, values, horizon, gamma=0.9):
    """Task-focused Sequential Engagement of one dialogue.

    TSE = sum_{t=1..H} gamma^(t-1) v_t / sum_{t=1..H} gamma^(t-1), with H = horizon, where
    events = e_1..e_T are the customer's events after agent turns 1..T and
      v_t = values.get(e_t, 0.0)          for t <= T  (None, "no reaction", and unknown events are 0)
      v_t = 1.0 if success else 0.0       for t >  T  (the dialogue is over; its outcome persists).
    Events past the horizon (t > H) are ignored. With values in [0, 1], TSE is in [0, 1].
    """
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    # padding to H with the outcome makes early success score higher than late success,
    # and early abandonment lower than late abandonment
    num = den = 0.0
    for t in range(horizon):
        v = values.get(events[t], 0.0) if t < len(events) else float(bool(success))
        w = gamma ** t
        num += w * v
        den += w
    return num / den


# ----------------------------------------------------------------------------- ESNDCG

def esndcg(pred, ref, lam=0.5):
    """Expert-sequence NDCG of a predicted strategy sequence `pred` against a reference `ref`.

    For t = 1..T in order, predicted position t is matched to the nearest not-yet-matched reference
    position s with ref[s] == pred[t] (ties in |s - t|: the earlier s). The gain is
    g_t = lam^|s-t| if matched, else 0. Then
      ESNDCG = (sum_{t=1..T} g_t / log2(t+1)) / (sum_{s=1..T*} 1 / log2(s+1)).
    Empty ref: 1.0 if pred is empty too, else 0.0. Empty pred with nonempty ref: 0.0.

    Bound (no clipping needed): at most k <= T* predicted positions are matched, each with g <= 1.
    Sorted, the matched positions t_1 < ... < t_k satisfy t_i >= i, so the numerator is at most
    sum_{i=1..k} 1/log2(i+1) <= the denominator. Hence ESNDCG is in [0, 1], and 1 iff pred starts
    with ref exactly. Note: extra predicted turns after the reference's length are not penalised.
    """
    if not ref:
        return 1.0 if not pred else 0.0
    used = [False] * len(ref)
    dcg = 0.0
    for t, z in enumerate(pred):
        best = None
        for s, zs in enumerate(ref):  # scanning s upward keeps the earlier s on ties
            if not used[s] and zs == z and (best is None or abs(s - t) < abs(best - t)):
                best = s
        if best is not None:
            used[best] = True
            dcg += lam ** abs(best - t) / math.log2(t + 2)  # 0-indexed t -> log2((t+1)+1)
    idcg = sum(1.0 / math.log2(s + 2) for s in range(len(ref)))
    return dcg / idcg


# ----------------------------------------------------------------------------- generation quality

def gre(strategies, recognised):
    """Generation reward: mean over agent turns of [recognised_t == strategies_t], i.e. the fraction of
    replies that a strategy recogniser judges to carry the strategy they were generated for. Empty -> 0.0."""
    assert len(strategies) == len(recognised), "one recognised strategy per agent turn"
    if not strategies:
        return 0.0
    return sum(a == b for a, b in zip(strategies, recognised)) / len(strategies)


def record_gre(rec, recognise):
    """GRE of one dialogue record: recognise(reply text) -> the strategy the world reads in it."""
    agent_turns = [t for t in rec["turns"] if t["role"] == "agent"]
    return gre([t["strategy"] for t in agent_turns], [recognise(t["text"]) for t in agent_turns])
def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyp_tokens_list, ref_tokens_list, max_n=4):
    """Corpus BLEU-4, one reference per hypothesis.

    p_n = clipped n-gram matches / hypothesis n-grams, both summed over the corpus. p_1 is unsmoothed;
    for n >= 2 add-one smoothing p_n = (matches + 1) / (total + 1) keeps one missing 4-gram from
    zeroing the score on short texts. BLEU = BP * exp(mean_n log p_n), with brevity penalty
    BP = 1 if c > r else exp(1 - r/c) (c, r = total hypothesis / reference lengths). 0.0 if c = 0 or p_1 = 0.
    """
    assert len(hyp_tokens_list) == len(ref_tokens_list), "one reference per hypothesis"
    matches, totals = [0] * max_n, [0] * max_n
    c = r = 0
    for hyp, ref in zip(hyp_tokens_list, ref_tokens_list):
        c += len(hyp)
        r += len(ref)
        for n in range(1, max_n + 1):
            h, rf = _ngrams(hyp, n), _ngrams(ref, n)
            matches[n - 1] += sum(min(k, rf[g]) for g, k in h.items())  # clip by reference counts
            totals[n - 1] += sum(h.values())
    if c == 0 or matches[0] == 0:
        return 0.0
    log_p = [math.log(matches[0] / totals[0])]
    log_p += [math.log((matches[n] + 1) / (totals[n] + 1)) for n in range(1, max_n)]
    bp = 1.0 if c > r else math.exp(1 - r / c)
    return bp * math.exp(sum(log_p) / max_n)


def rouge_l(hyp_tokens, ref_tokens):
    """ROUGE-L F1: with L = length of the longest common subsequence, P = L/|hyp|, R = L/|ref|,
    F = 2PR / (P + R). 0.0 if either side is empty or L = 0."""
    if not hyp_tokens or not ref_tokens:
        return 0.0
    # classic O(|hyp| |ref|) LCS dynamic program, one row at a time
    prev = [0] * (len(ref_tokens) + 1)
    for h in hyp_tokens:
        cur = [0]
        for j, r in enumerate(ref_tokens):
            cur.append(prev[j] + 1 if h == r else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp_tokens), lcs / len(ref_tokens)
    return 2 * p * r / (p + r)


# ----------------------------------------------------------------------------- statistics

def bootstrap_ci(xs, n_boot=2000, seed=0, level=0.95):
    """Mean with a percentile bootstrap confidence interval, for a continuous per-dialogue score
    (TSE, ESNDCG, GRE, BLEU, ROUGE-L, turns, order value): resample the n values with replacement
    n_boot times (random.Random(seed): the same interval every run) and take the tail quantiles of
    the resampled means. Every resampled mean lies between min(xs) and max(xs), so the interval stays
    inside the observed range whatever the values (the normal interval gave order value 7 [-4, 18]),
    and it has zero width when every value is the same. The clamps below only absorb float rounding,
    and keep the mean inside its own interval. n = 0 -> (nan, nan, nan)."""
    xs = [float(x) for x in xs]
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choices(xs, k=n)) / n for _ in range(n_boot))   # choices: ~4x faster than a randrange loop
    tail = (1 - level) / 2
    lo_x, hi_x = min(xs), max(xs)
    m = min(hi_x, max(lo_x, sum(xs) / n))   # the same mean as before, kept in range despite rounding
    lo, hi = boots[int(tail * n_boot)], boots[int((1 - tail) * n_boot) - 1]
    return (m, max(lo_x, min(m, lo)), min(hi_x, max(m, hi)))


def rate_ci(xs, level=0.95):
    """A proportion (xs all 0 or 1: success, sop_ok) with its Wilson score interval, which stays
    inside [0, 1] and keeps its coverage near 0 and 1, where a normal interval does neither (it gives
    0.010 [-0.004, 0.024] for 2 successes in 200). Unlike the bootstrap it is not zero-width at
    200 successes in 200: a rate seen at 1 may still be below 1. n = 0 -> (nan, nan, nan)."""
    if any(x not in (0, 1) for x in xs):
        raise ValueError("rate_ci: a rate's values must all be 0 or 1 (a continuous score takes bootstrap_ci)")
    n = len(xs)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    k = sum(float(x) for x in xs)
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)     # 1.95996... at 95%
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)))   # p inside despite rounding


def paired_diff_ci(xa, xb, n_boot=2000, seed=0, level=0.95):
    """mean(xa - xb) over paired items (two methods on the same customers) with a percentile
    bootstrap interval over the items: tighter than comparing two separate intervals, because each
    customer's own difficulty cancels. Returns (mean, low, high)."""
    d = [float(a) - float(b) for a, b in zip(xa, xb, strict=True)]
    n, rng = len(d), random.Random(seed)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    boots = sorted(sum(d[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    tail = (1 - level) / 2
    return (sum(d) / n, boots[int(tail * n_boot)], boots[int((1 - tail) * n_boot) - 1])


def mean_ci(xs, rate=False):
    """{"mean": mean, "ci95": [lo, hi]}, ready for a JSON report. The rule follows the kind of metric,
    never its values: a rate (a binary outcome per dialogue: success, sop_ok; rate=True) gets the
    Wilson interval of `rate_ci`; a continuous score gets the bootstrap interval of `bootstrap_ci`,
    even where its values happen to be all 0 or 1 (an oracle's ESNDCG of 1 is a score, not a rate)."""
    m, lo, hi = rate_ci(xs) if rate else bootstrap_ci(xs)
    return {"mean": m, "ci95": [lo, hi]}


def mean(xs):
    """The mean of an iterable; 0.0 if it is empty (an iteration with no pairs logs 0, not an error)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else 0.0


# ----------------------------------------------------------------------------- one trajectory
def turn_values(rec, values, horizon):
    """(v_1..v_H): the value of each agent turn's event, padded after the end with the outcome
    (1 if the task succeeded, else 0), exactly as tse.tse reads a dialogue; and T, the turns played."""
    turns = rec["turns"]
    events = [turns[i + 1]["event"] if i + 1 < len(turns) and turns[i + 1]["role"] == "customer" else None
              for i, t in enumerate(turns) if t["role"] == "agent"][:horizon]
    v = [values.get(e, 0.0) for e in events]
    return v + [float(bool(rec["success"]))] * (horizon - len(v)), len(v)



def trajectory_metrics(rec, values, horizon, gamma=0.9):
    """TSE, ESNDCG, success and agent-turn count of one dialogue record.

    The event of agent turn t is the event of the customer turn right after it (None if the next turn
    is not a customer turn, e.g. the dialogue ends on the agent). ESNDCG compares the agent turns'
    strategies with rec["ref_strategies"].
    """
    turns = rec["turns"]
    strategies, events = [], []
    for i, turn in enumerate(turns):
        if turn["role"] == "agent":
            strategies.append(turn["strategy"])
            nxt = turns[i + 1] if i + 1 < len(turns) else None
            events.append(nxt["event"] if nxt is not None and nxt["role"] == "customer" else None)
    return {"tse": tse(events, rec["success"], values, horizon, gamma),
            "esndcg": esndcg(strategies, rec["ref_strategies"]),
            "success": float(rec["success"]),
            "turns": len(strategies)}

"""The flat agent: one causal LM that writes each reply straight from the dialogue so far, with no
Expert, no strategy token and no instruction (serialize.flat_prompt_ids). It is the single agent of
the paper's baselines: PPO trains it (experiments/ppo.py), and the no-Expert ablation trains it with
GOPO's own loss (experiments/baselines.py). SFT trains it on the same logged replies as the CS Agent
(train.py --method sft writes flat_sft/). A turn's strategy in its record is the act the world
recognises in the reply; there are no decisions, Expert ids or SOP masks.
"""
import time

import agent as agent_lib
import checkpoint
import gopo
import lm
import rollout as rollout_lib
import serialize


def flat_batch(trajs, pad_id, after_branch=False, segment=0):
    """Flat-agent trajectories -> ids, attn, reply-token mask, all (B, L), right-padded.
    after_branch: the mask keeps only the replies the ablation's loss scores (scored_replies)."""
    ids, attn = lm.pad([t["agent_ids"] for t in trajs], pad_id)
    mask, _ = lm.pad([agent_lib.reply_mask(len(t["agent_ids"]), scored_replies(t, segment) if after_branch
                                           else t["replies"]) for t in trajs], 0)
    return ids, attn, mask.float()

def scored_replies(tr, segment=0):
    """The reply spans the ablation's loss scores: from the trajectory's branch turn on (--rollouts
    branch: the replies before it are the same tokens in both dialogues of a pair, and cancel), and
    with --segment N only N of them (gopo.scored_steps for the flat agent)."""
    b = tr["branch"]
    return tr["replies"][b:b + segment if segment else None]

def token_logps_values(model, value_head, ids, attn, target_mask, temperature=1.0):
    """log pi_T(ids[:, i] | ids[:, :i]) (B, L-1) at temperature T on the target tokens (0 elsewhere),
    and, with a value head, V of the state before each of those tokens (B, L-1); else None. The
    output layer runs on the targets only (lm.target_logps), never on (B, L, V)."""
    if value_head is None:
        return lm.target_logps(model, ids, attn, target_mask, temperature), None
    return lm.target_logps(model, ids, attn, target_mask, temperature, extra=value_head)

class FlatDialogues(rollout_lib.Dialogues):
    """The flat agent's dialogues (rollout.py's loop): one LM writes each reply straight from the
    history (serialize.flat_prompt_ids: no strategy token, no instruction, no Expert). A turn's strategy in
    the record is the act the world recognises in the reply; there are no decisions, Expert ids or
    SOP masks. FlatDialogues((model, tok), scenarios, world, seed).play(greedy, temperature, max_reply_tokens)."""

    def ask(self, t, live, greedy):
        self.agent_ctx.extend([serialize.flat_prompt_ids(self.tok_a)] * len(live))
        return [None] * len(live)

def flat_rollout(agent, scenarios, world, args, seed, rollouts="independent"):
    """K sampled dialogues of the flat agent per scenario (the same batch layout as GOPO's), played as
    GOPO's are (rollout.play_groups: independent, or --rollouts branch; branched at any turn, the flat
    agent having no decision distribution to weight the turns by)."""
    make = lambda batch, index, **kw: FlatDialogues(agent, batch, world, seed, index=index, **kw)  # noqa: E731
    return [tr for group in rollout_lib.play_groups(make, scenarios, args.k, list(range(len(scenarios))), seed,
                                                    rollouts, "uniform", args.agent_temperature, args.max_reply_tokens)
            for tr in group]

def rollout_metrics(trajs, scores, world, t0, pairs=(), **extra):
    """A baseline's metrics.jsonl line after "iter": what every method logs of its rollouts
    (gopo.rollout_scores of joint_reward's `scores`), the method's own `extra`, the decision groups'
    accuracy (gopo.decision_stats; a flat agent's decision is the act recognised in its reply) and,
    given its preference pairs, what they contrast."""
    return {**gopo.rollout_scores(scores, trajs), **extra, **gopo.decision_stats(trajs, pairs, world),
            "turns_played": rollout_lib.turns_played(trajs), "seconds": round(time.time() - t0, 2)}


def play_flat(ckpt, method, scenarios, world, seed, max_reply_tokens=32):
    """eval.py: greedy dialogues of a run's flat agent (checkpoint.METHODS[method].agent)."""
    agent = ckpt[checkpoint.METHODS[method].agent]
    return [t["record"] for t in FlatDialogues(agent, scenarios, world, seed).play(True, 0.7, max_reply_tokens)]

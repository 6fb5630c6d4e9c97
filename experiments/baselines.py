"""The baselines of the paper's comparison: flat PPO, Memento and the no-Expert ablation.

    python -m experiments.baselines --algo ppo --sft-from out/sft   # train.py's flags and stages, plus these
    python -m experiments.baselines eval out/ppo                    # eval.py, with these methods known

GOPO itself is gopo.py and `train.py --algo sft` the SFT stages alone. Every method gets the same
budget after the same SFT data: `iters x scenarios x k` simulated dialogues on the same training
scenarios (train.train_loop), and each `*_iteration` below returns one metrics.jsonl line from that
iteration's rollouts. This module adds its methods to checkpoint.METHODS (their SFT models, eval
rows and how eval.py plays them); nothing at the top level imports it. What each one really is:

- ppo: the flat single-agent baseline. One causal LM (the *flat agent*: SFT on the same logged
  replies, but its prompt has no strategy token and no instruction, lm.flat_prompt_ids) writes each
  reply from the history, and token-level PPO trains it. Our choices, where the paper is silent:
    * the policy is the sampling distribution of the rollouts, softmax(logits / T) with T =
      --agent-temperature, so the importance ratios are exact (on-policy up to the epochs);
    * a linear value head on the LM's last hidden state (shared trunk), V(s) before each reply token;
    * rewards on the last token of each reply: r_t = gamma^(t-1) v(e_t) / D, and at the last reply
      also the outcome's share of the padded horizon (`turn_rewards`), so that the undiscounted
      return of a dialogue is exactly its TSE (tse.tse), the metric it is evaluated on;
    * minus a per-token KL penalty to the frozen SFT flat agent folded into the rewards
      (kl_shaped_rewards, as in Ouyang et al. 2022); GAE(gamma=1, lambda) over the reply tokens of a
      dialogue (customer tokens are the environment), lambda = 1 by default (the Monte Carlo
      return minus V): the outcome sits 100+ tokens after the decisive words of a dialogue, and
      lambda = 0.95 let almost none of it reach them (0.95^100 < 0.01) before V had learned;
      advantages whitened over the batch;
    * the clipped surrogate (Schulman et al. 2017) + 0.5 x squared value error, a few epochs of
      minibatches per iteration, gradient norm clipped at 1.
- gopo-noexpert: the ablation. GOPO's loss unchanged (gopo.preference_loss + lambda NLL of the
  winners, the same R, pairs and budget), but S(tau) sums the flat agent's reply-token log-probs,
  since there is no Expert and no strategy decision. R's ESNDCG reads the strategies the world
  recognises in the replies.
- memento: case-based reasoning with no gradient step on any LM (after Memento, Zhou et al. 2025).
  A case bank of (state embedding, strategy, observed return); the frozen SFT Expert proposes, the
  bank decides, the frozen SFT CS Agent writes. Our choices:
    * state embedding: a TF-IDF bag of words of the history, each turn weighted decay^age (age 0 =
      the customer's last utterance), the strategy labels of past agent turns as words "z:<name>";
      vocabulary and IDF from the logged training dialogues; cosine similarity;
    * observed return: the TSE of the rest of the dialogue from that turn (`returns_to_go`);
    * decision: among the cases whose strategy the SOP allows now, the k most similar; the strategy
      with the highest similarity-weighted mean return among them; where none is retrieved, the SFT
      Expert's argmax. While training, with probability --memento-eps the SFT Expert samples instead
      (exploration);
    * the bank starts with the cases of the logged training dialogues (the SFT data; --no-memento-logs
      starts it empty) and grows with every training rollout. Evaluation reads it, never writes it.
"""
import argparse
import copy
import math
import os
import random
import re
import sys
import time

import train   # first: its top sets OMP_WAIT_POLICY and HF_HUB_OFFLINE, which torch and transformers read on import

import torch
import torch.nn.functional as F

import agent as agent_lib
import checkpoint
import cli
import engine
import eval as eval_lib
import expert as expert_lib
import gopo
import lm
import parallel
import rollout as rollout_lib


# ----------------------------------------------------------------------------- PPO math (pure functions)
def gae(rewards, values, gamma=1.0, lam=0.95):
    """Generalised advantage estimation along one sequence.

    rewards (T,), values (T + 1,) with values[T] the bootstrap value after the last step (0 at the end
    of a dialogue). delta_t = r_t + gamma V_{t+1} - V_t; A_t = delta_t + gamma lam A_{t+1}.
    Returns (advantages (T,), returns (T,) = advantages + values[:T]).
    """
    T = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    running = torch.zeros((), dtype=rewards.dtype)
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        running = delta + gamma * lam * running
        adv[t] = running
    return adv, adv + values[:T]


def ppo_clip_loss(logp_new, logp_old, advantages, clip=0.2):
    """Clipped surrogate, per token (all (N,)): -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(new - old)."""
    ratio = torch.exp(logp_new - logp_old)
    return -torch.minimum(ratio * advantages, ratio.clamp(1 - clip, 1 + clip) * advantages)


def kl_shaped_rewards(rewards, logp_policy, logp_ref, beta):
    """Per-token rewards minus beta times the sampled KL estimate log pi(a) - log pi_ref(a) (all (T,)):
    tokens the policy likes more than the SFT model pay a penalty, tokens it likes less earn a bonus."""
    return rewards - beta * (logp_policy - logp_ref)


# ----------------------------------------------------------------------------- rewards of one dialogue
def turn_values(rec, values, horizon):
    """(v_1..v_H): the value of each agent turn's event, padded after the end with the outcome
    (1 if the task succeeded, else 0), exactly as tse.tse reads a dialogue; and T, the turns played."""
    turns = rec["turns"]
    events = [turns[i + 1]["event"] if i + 1 < len(turns) and turns[i + 1]["role"] == "customer" else None
              for i, t in enumerate(turns) if t["role"] == "agent"][:horizon]
    v = [values.get(e, 0.0) for e in events]
    return v + [float(bool(rec["success"]))] * (horizon - len(v)), len(v)


def turn_rewards(rec, values, horizon, gamma=0.9):
    """PPO's per-turn rewards (T,), whose sum is exactly TSE(tau):
    r_t = gamma^(t-1) v_t / D for t = 1..T, plus at t = T the outcome's share of the horizon,
    sum_{t=T+1..H} gamma^(t-1) v_t / D, with D = sum_{t=1..H} gamma^(t-1)."""
    v, T = turn_values(rec, values, horizon)
    D = sum(gamma ** t for t in range(horizon))
    r = [gamma ** t * v[t] / D for t in range(T)]
    if T:
        r[-1] += sum(gamma ** t * v[t] for t in range(T, horizon)) / D
    return r


def returns_to_go(rec, values, horizon, gamma=0.9):
    """Memento's observed return of each agent turn t = 1..T: the TSE of the rest of the dialogue,
    G_t = sum_{s=t..H} gamma^(s-t) v_s / sum_{s=t..H} gamma^(s-t) (so G_1 = TSE(tau), and every
    G_t is in [0, 1] whatever t)."""
    v, T = turn_values(rec, values, horizon)
    return [sum(gamma ** (s - t) * v[s] for s in range(t, horizon)) /
            sum(gamma ** (s - t) for s in range(t, horizon)) for t in range(T)]


# ----------------------------------------------------------------------------- the flat agent
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
    history (lm.flat_prompt_ids: no strategy token, no instruction, no Expert). A turn's strategy in
    the record is the act the world recognises in the reply; there are no decisions, Expert ids or
    SOP masks. FlatDialogues(model, tok, scenarios, world, seed).play(greedy, temperature, max_reply_tokens)."""

    def prompt(self, t, live, greedy):
        self.agent_ctx.extend([lm.flat_prompt_ids(self.tok_a)] * len(live))
        return [None] * len(live)


def flat_rollout(model, tok, scenarios, world, args, seed, rollouts="independent"):
    """K sampled dialogues of the flat agent per scenario (the same batch layout as GOPO's), played as
    GOPO's are (rollout.play_groups: independent, or --rollouts branch; branched at any turn, the flat
    agent having no decision distribution to weight the turns by)."""
    make = lambda batch, index, **kw: FlatDialogues(model, tok, batch, world, seed, index=index, **kw)  # noqa: E731
    return [tr for group in rollout_lib.play_groups(make, scenarios, args.k, list(range(len(scenarios))), seed,
                                                    rollouts, "uniform", args.agent_temperature, args.max_reply_tokens)
            for tr in group]


def rollout_metrics(trajs, values, world, args, t0, pairs=(), **extra):
    """The metrics.jsonl line every method shares: R and what it is built from, and the decision
    groups' accuracy (gopo.decision_stats; a flat agent's decision is the act recognised in its
    reply), on the rollouts; pairs: the preference pairs, if the method has any."""
    scores = [gopo.joint_reward(tr["record"], values, world.HORIZON, args.alpha) for tr in trajs]
    return {"R": gopo.mean(m["R"] for m in scores), "tse": gopo.mean(m["tse"] for m in scores),
            "esndcg": gopo.mean(m["esndcg"] for m in scores), "success": gopo.mean(m["success"] for m in scores),
            **extra, **gopo.decision_stats(trajs, pairs, world), "seconds": round(time.time() - t0, 2)}


def token_rewards(trajs, values, horizon, L):
    """(B, L-1) rewards aligned with token_logps_values' targets: each turn's `turn_rewards` on the
    target index of its reply's last token (<|eot|>, at position end - 1), 0 elsewhere."""
    rewards = torch.zeros(len(trajs), L - 1)
    for b, tr in enumerate(trajs):
        for (_, end), r in zip(tr["replies"], turn_rewards(tr["record"], values, horizon)):
            rewards[b, end - 2] = r
    return rewards


class ValueHead(torch.nn.Module):
    """V(s) = w . h + b on the LM's last hidden state h (d,), zero-initialised (V = 0 at the start)."""

    def __init__(self, d):
        super().__init__()
        self.linear = torch.nn.Linear(d, 1)
        torch.nn.init.zeros_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, h):
        return self.linear(h)


def ppo_iteration(model, value_head, ref_model, tok, opt, scenarios, values, world, args, it, seed):
    """Rollout -> per-token rewards, KL shaping, GAE -> a few epochs of clipped PPO. One metrics line."""
    t0 = time.time()
    trajs = flat_rollout(model, tok, scenarios, world, args, seed)
    ids, attn, mask = (x.to(model.device) for x in flat_batch(trajs, tok.pad_token_id))
    act = mask[:, 1:].bool()                                       # (B, L-1): target index j predicts ids[:, j+1]
    T = args.agent_temperature
    with torch.no_grad():
        old_logps, old_values = token_logps_values(model, value_head, ids, attn, mask, T)   # (B, L-1) each
        ref_logps, _ = token_logps_values(ref_model, None, ids, attn, mask, T)
    rewards = token_rewards(trajs, values, world.HORIZON, ids.shape[1]).to(model.device)  # (B, L-1)
    shaped = kl_shaped_rewards(rewards, old_logps, ref_logps, args.kl_coef)
    adv, ret = torch.zeros_like(rewards), torch.zeros_like(rewards)
    for b in range(len(trajs)):      # GAE over this dialogue's reply tokens only; V = 0 after the end
        j = act[b].nonzero().squeeze(1)
        a, g = gae(shaped[b, j], torch.cat([old_values[b, j], old_values.new_zeros(1)]), 1.0, args.gae_lambda)
        adv[b, j], ret[b, j] = a, g
    adv = torch.where(act, (adv - adv[act].mean()) / (adv[act].std() + 1e-8), adv)     # whitened
    both = torch.nn.ModuleList([model, value_head])
    rng = random.Random(seed)
    model.train()
    pg_losses, v_losses, skipped = [], [], 0
    for _ in range(args.ppo_epochs):
        order = list(range(len(trajs)))
        rng.shuffle(order)
        for i in range(0, len(order), args.ppo_minibatch):
            mb = torch.tensor(order[i:i + args.ppo_minibatch], device=model.device)
            m = act[mb]
            new_logps, new_values = token_logps_values(model, value_head, ids[mb], attn[mb], mask[mb], T)
            pg = ppo_clip_loss(new_logps[m], old_logps[mb][m], adv[mb][m], args.clip).mean()
            vf = 0.5 * (new_values[m] - ret[mb][m]).pow(2).mean()
            if lm.guarded_step(both, opt, pg + args.vf_coef * vf):
                pg_losses.append(pg.item())
                v_losses.append(vf.item())
            else:
                skipped += 1
    model.eval()
    kl = ((old_logps - ref_logps)[act]).mean().item()
    return {"iter": it, **rollout_metrics(trajs, values, world, args, t0, loss=gopo.mean(pg_losses) if pg_losses else None,
                                          value_loss=gopo.mean(v_losses) if v_losses else None, kl=kl,
                                          nonfinite_steps=skipped)}


def flat_dpo_iteration(model, tok, opt, scenarios, values, world, args, it, seed):
    """The no-Expert ablation: GOPO's rollout -> R -> pairs -> trajectory DPO, on the flat agent's
    reply tokens. S(tau) = sum of its reply-token log-probs; the reference is the agent that sampled."""
    t0 = time.time()
    trajs = flat_rollout(model, tok, scenarios, world, args, seed, args.rollouts)
    rewards = [gopo.joint_reward(tr["record"], values, world.HORIZON, args.alpha)["R"] for tr in trajs]
    groups = [list(range(i * args.k, (i + 1) * args.k)) for i in range(len(scenarios))]
    said = lambda tr: [tr["agent_ids"][s:e] for s, e in scored_replies(tr, args.segment)]   # noqa: E731
    pairs = gopo.build_pairs(rewards, groups, args.delta, args.max_pairs,
                             (lambda w, l: said(trajs[w]) != said(trajs[l])) if args.segment else None)
    losses, skipped = [], 0
    if pairs:
        used = sorted({i for p in pairs for i in p})
        row = {i: r for r, i in enumerate(used)}
        ids, attn, mask = (x.to(model.device) for x in flat_batch([trajs[i] for i in used], tok.pad_token_id,
                                                                  after_branch=True, segment=args.segment))
        n_tokens = mask.sum(-1)                                                  # (N,)
        with torch.no_grad():
            S_ref = agent_lib.reply_logps(model, ids, attn, mask)                # (N,)
        w = torch.tensor([row[a] for a, _ in pairs], device=model.device)
        l = torch.tensor([row[b] for _, b in pairs], device=model.device)
        model.train()
        for _ in range(args.gopo_epochs):
            S = agent_lib.reply_logps(model, ids, attn, mask)                    # (N,) eq. (2) on reply tokens
            pref, _, _ = gopo.preference_loss(S[w], S[l], S_ref[w], S_ref[l], args.beta)   # (P,) eq. (3)
            loss = (pref + args.nll_coef * -S[w] / n_tokens[w]).mean()           # eq. (4)
            if lm.guarded_step(model, opt, loss):
                losses.append(loss.item())
            else:
                skipped += 1
        model.eval()
    return {"iter": it, **rollout_metrics(trajs, values, world, args, t0, loss=gopo.mean(losses) if losses else None,
                                          nonfinite_steps=skipped, pairs=pairs), "pairs": len(pairs)}


# ----------------------------------------------------------------------------- the command line
ALGOS = {"ppo": "flat agent, token-level PPO", "memento": "case bank over the frozen SFT agents",
         "gopo-noexpert": "GOPO's loss on a flat agent"}


def add_flags(p):
    """train.py's parser (train.p) becomes this command's: the baselines as its --algo, their own flags."""
    p.description = __doc__.split("\n")[0]
    train.ALGO.choices, train.ALGO.default, train.ALGO.required = list(ALGOS), None, True
    train.ALGO.help = "the baseline: " + "; ".join(f"{a} ({what})" for a, what in ALGOS.items())
    positive, nonneg, checked = cli.positive, cli.nonneg, cli.checked
    g = p.add_argument_group("baselines (same budget as GOPO: --iters x --scenarios x --k dialogues)")
    g.add_argument("--flat-lr", type=positive(float), default=3e-4, help="flat agent learning rate (ppo, gopo-noexpert)")
    g.add_argument("--kl-coef", type=nonneg(float), default=0.02, help="ppo: per-token KL penalty to the SFT flat agent")
    g.add_argument("--clip", type=positive(float), default=0.2, help="ppo: ratio clip range epsilon")
    g.add_argument("--gae-lambda", type=checked(float, 0, True, 1), default=1.0, help="ppo: GAE lambda (gamma is 1)")
    g.add_argument("--vf-coef", type=nonneg(float), default=0.5, help="ppo: weight of the value loss")
    g.add_argument("--ppo-epochs", type=positive(int), default=4, help="ppo: passes over each iteration's rollouts")
    g.add_argument("--ppo-minibatch", type=positive(int), default=16, help="ppo: dialogues per gradient step")
    g.add_argument("--memento-k", type=positive(int), default=16, help="memento: cases retrieved per decision")
    g.add_argument("--memento-eps", type=checked(float, 0, True, 1), default=0.2,
                   help="memento: share of training decisions sampled from the SFT Expert (exploration)")
    g.add_argument("--memento-decay", type=checked(float, 0, False, 1), default=0.5,
                   help="memento: weight of a turn in the state embedding per turn of age")
    g.add_argument("--memento-logs", default=True, action=argparse.BooleanOptionalAction,
                   help="memento: start the case bank with the cases of the logged training dialogues")


def check_flags(args):
    """The baselines' own conflicts (train.check_flags has run): one line, exit 2."""
    if args.fsdp:
        cli.die(f"--algo {args.algo} runs without FSDP (in one process; --bf16 gives it bf16 compute); drop --fsdp")
    if parallel.world() > 1:
        cli.die(f"--algo {args.algo} runs in one process (only train.py's gopo and sft are distributed); drop torchrun")
    if args.resume:
        cli.die(f"--resume continues train.py's gopo and sft runs only; start the {args.algo} run again "
                "(baselines take a few minutes)")
    if args.rollouts == "branch" and args.algo != "gopo-noexpert":
        cli.die(f"--rollouts branch is for GOPO's preference pairs (gopo, gopo-noexpert); --algo {args.algo} "
                "plays independent rollouts")
    if args.algo == "gopo-noexpert" and args.k < 2:   # ppo and memento learn from one rollout per scenario too
        cli.die(f"--k must be >= 2 for --algo gopo-noexpert: a preference pair compares two rollouts of one "
                f"scenario, got {args.k}")
    if args.algo == "ppo" and args.agent_temperature == 0:
        cli.die("--algo ppo needs sampled rollouts: --agent-temperature must be > 0 (it is the policy's temperature)")


def main(argv=None):
    """train.py's stages, with the baseline's step and checkpoint writer."""
    if "--flat-lr" not in train.p._option_string_actions:   # once per process
        add_flags(train.p)
    run = train.open_run(*train.parse(argv, check_flags))
    train.load_logs(run)
    models = train.run_sft(run, train.build_models(run))
    step, save = trainer(run, models)
    train.train_loop(run, step)
    save(run.dir)
    train.save_outputs(run)


def trainer(run, models):
    """A baseline's (step(scenarios, it, seed) -> metrics line, save(run_dir)) for train.train_loop.
    models: the placed SFT models, the flat agent for ppo and gopo-noexpert, both agents for memento."""
    algo, args, values, world = run.args.algo, run.args, run.values, run.world
    if algo == "ppo":
        agent_model, tok_a = models["flat"]
        ref_model = copy.deepcopy(agent_model).eval()           # the frozen SFT flat agent (KL penalty)
        value_head = ValueHead(agent_model.config.hidden_size).to(run.device)
        opt = torch.optim.AdamW([*agent_model.parameters(), *value_head.parameters()], lr=args.flat_lr,
                                weight_decay=0.0)

        def save(run_dir):
            lm.save(agent_model, tok_a, os.path.join(run_dir, "flat"))
            torch.save(value_head.state_dict(), os.path.join(run_dir, "value_head.pt"))
        return (lambda scenarios, it, seed: ppo_iteration(agent_model, value_head, ref_model, tok_a, opt, scenarios,
                                                          values, world, args, it, seed)), save
    if algo == "gopo-noexpert":
        agent_model, tok_a = models["flat"]
        opt = torch.optim.AdamW(agent_model.parameters(), lr=args.flat_lr, weight_decay=0.0)
        return (lambda scenarios, it, seed: flat_dpo_iteration(agent_model, tok_a, opt, scenarios, values, world,
                                                               args, it, seed)), \
            (lambda run_dir: lm.save(agent_model, tok_a, os.path.join(run_dir, "flat")))
    if algo == "memento":
        (expert_model, tok_e), (agent_model, tok_a) = models["expert"], models["agent"]
        bank = CaseBank.from_logs(run.logs, world.STRATEGIES, args.memento_k, args.memento_decay)
        if args.memento_logs:
            bank.add(run.logs, values, world.HORIZON)
        return (lambda scenarios, it, seed: memento_iteration(expert_model, agent_model, tok_e, tok_a, bank, scenarios,
                                                              values, world, args, it, seed)), \
            (lambda run_dir: torch.save(bank.state_dict(), os.path.join(run_dir, "bank.pt")))
    raise ValueError(f"not a baseline: {algo}")


# ----------------------------------------------------------------------------- Memento
def words(text):
    return re.findall(r"[a-z0-9%]+", text.lower())


class CaseBank:
    """Memento's case memory: keys (N, D) unit state embeddings, z (N,) strategy index, g (N,) return."""

    def __init__(self, vocab, idf, strategies, k=16, decay=0.5):
        self.vocab, self.strategies, self.k, self.decay = vocab, strategies, k, decay
        self.index = {w: i for i, w in enumerate(vocab)}
        self.idf = torch.tensor(idf)
        self.keys = torch.zeros(0, len(vocab))
        self.z = torch.zeros(0, dtype=torch.long)
        self.g = torch.zeros(0)

    @classmethod
    def from_logs(cls, records, strategies, k=16, decay=0.5):
        """Vocabulary and IDF (per turn, smoothed) from the logged training dialogues; an empty bank."""
        docs = [set(turn_words(t)) for r in records for t in r["turns"]]
        vocab = sorted(set().union(*docs) | {f"z:{z}" for z in strategies})
        df = {w: 0 for w in vocab}
        for d in docs:
            for w in d:
                df[w] += 1
        idf = [math.log((len(docs) + 1) / (df[w] + 1)) + 1 for w in vocab]
        return cls(vocab, idf, strategies, k, decay)

    def embed(self, turns):
        """The state before the next agent turn: (D,) unit vector, TF-IDF with recency weights."""
        x = torch.zeros(len(self.vocab))
        for age, t in enumerate(reversed(turns)):
            w = self.decay ** age
            for word in turn_words(t):
                if word in self.index:
                    x[self.index[word]] += w
        x = x * self.idf
        return x / x.norm().clamp(min=1e-8)

    def add(self, records, values, horizon, gamma=0.9):
        """One case per agent turn of each record: (state before it, its strategy, its return-to-go)."""
        keys, zs, gs = [], [], []
        zi = {z: i for i, z in enumerate(self.strategies)}
        for rec in records:
            turns = rec["turns"]
            agent_at = [i for i, t in enumerate(turns) if t["role"] == "agent"][:horizon]
            for i, g in zip(agent_at, returns_to_go(rec, values, horizon, gamma)):
                keys.append(self.embed(turns[:i]))
                zs.append(zi[turns[i]["strategy"]])
                gs.append(g)
        if keys:
            self.keys = torch.cat([self.keys, torch.stack(keys)])
            self.z = torch.cat([self.z, torch.tensor(zs)])
            self.g = torch.cat([self.g, torch.tensor(gs)])

    def q_values(self, turns_list, allowed):
        """(B, Z) similarity-weighted mean return of each strategy among the k nearest allowed cases
        of each state; nan where no such case was retrieved."""
        B, Z = allowed.shape
        q = torch.full((B, Z), float("nan"))
        if not len(self.z):
            return q
        sims = torch.stack([self.embed(t) for t in turns_list]) @ self.keys.T        # (B, N)
        sims = sims.masked_fill(~allowed[:, self.z], float("-inf"))                   # SOP before retrieval
        top, idx = sims.topk(min(self.k, sims.shape[1]), dim=1)                       # (B, k)
        ok = torch.isfinite(top)
        wt = torch.where(ok, top.clamp(min=1e-6), torch.zeros_like(top))            # (B, k)
        onehot = F.one_hot(self.z[idx], Z).float() * wt[..., None]                    # (B, k, Z)
        num = (onehot * self.g[idx][..., None]).sum(1)                                # (B, Z)
        den = onehot.sum(1)
        return torch.where(den > 0, num / den.clamp(min=1e-12), q)

    def choose(self, turns_list, allowed, logps, explore=0.0, gen=None):
        """(B,) strategy indices: the bank's best retrieved strategy, the Expert's argmax where the
        bank retrieved nothing; with probability `explore`, a sample of the Expert's distribution."""
        q = self.q_values(turns_list, allowed)
        known = torch.isfinite(q)
        z = torch.where(known.any(1), q.masked_fill(~known, float("-inf")).argmax(1), logps.argmax(1))
        if explore > 0:
            sample = engine.gumbel_argmax(logps, torch.rand(logps.shape, generator=gen))
            z = torch.where(torch.rand(len(z), generator=gen) < explore, sample, z)
        return z

    def state_dict(self):
        return {"vocab": self.vocab, "idf": self.idf, "strategies": self.strategies, "k": self.k,
                "decay": self.decay, "keys": self.keys, "z": self.z, "g": self.g}

    @classmethod
    def load(cls, path):
        s = torch.load(path)
        bank = cls(s["vocab"], s["idf"].tolist(), s["strategies"], s["k"], s["decay"])
        bank.keys, bank.z, bank.g = s["keys"], s["z"], s["g"]
        return bank


def turn_words(turn):
    return words(turn["text"]) + ([f"z:{turn['strategy']}"] if turn["role"] == "agent" and turn["strategy"] else [])


class MementoDialogues(rollout_lib.ExpertDialogues):
    """Memento's dialogues (rollout.py's loop): the case bank decides among the strategies the SOP
    allows, from the frozen SFT Expert's masked distribution (its argmax where the bank retrieves
    nothing; a sample of it with probability `explore`, drawn from `gen`); the frozen SFT CS Agent
    writes. ref_logps records the Expert's log-prob of each choice. MementoDialogues(bank, explore,
    gen, then ExpertDialogues' arguments)."""

    def __init__(self, bank, explore, gen, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bank, self.explore, self.gen = bank, explore, gen

    def decide(self, logits, allowed, uniforms, live):
        logps = expert_lib.masked_logps(logits, self.strategy_ids, allowed)      # (B, Z): one distribution
        z = self.bank.choose([self.trajs[i]["turns"] for i in live], allowed, logps.cpu(), self.explore,
                             self.gen).to(logps.device)
        return z, logps.gather(1, z[:, None]).squeeze(1)


def memento_iteration(expert_model, agent_model, tok_e, tok_a, bank, scenarios, values, world, args, it, seed):
    """Rollouts whose decisions the bank makes (with exploration), then every turn into the bank."""
    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    batch = [s for s in scenarios for _ in range(args.k)]
    trajs = MementoDialogues(bank, args.memento_eps, gen, expert_model, agent_model, tok_e, tok_a, batch, world,
                             seed).play(False, args.agent_temperature, args.max_reply_tokens)
    records = [tr["record"] for tr in trajs]
    bank.add(records, values, world.HORIZON)
    return {"iter": it, **rollout_metrics(trajs, values, world, args, t0, gre=gopo.mean(gopo.gre(r, world.recognise) for r in records),
                                          cases=len(bank.z))}


# ----------------------------------------------------------------------------- eval.py's hooks, the registry
def play_flat(ckpt, method, scenarios, world, seed, max_reply_tokens=32):
    """eval.py: greedy dialogues of a run's flat agent (checkpoint.METHODS[method].agent)."""
    model, tok = ckpt[checkpoint.METHODS[method].agent]
    return [t["record"] for t in FlatDialogues(model, tok, scenarios, world, seed).play(True, 0.7, max_reply_tokens)]


def play_memento(ckpt, method, scenarios, world, seed, max_reply_tokens=32):
    """eval.py: greedy dialogues of Memento, its bank read, never written (no exploration)."""
    m = checkpoint.METHODS[method]
    (expert_model, tok_e), (agent_model, tok_a) = ckpt[m.expert], ckpt[m.agent]
    return [t["record"] for t in MementoDialogues(ckpt["bank.pt"], 0.0, None, expert_model, agent_model, tok_e, tok_a,
                                                  scenarios, world, seed).play(True, 0.7, max_reply_tokens)]


Method = checkpoint.Method
checkpoint.METHODS.update({
    "ppo": Method(sft=("flat",), rows=("ppo", "sft-flat"), agent="flat", play=play_flat),
    "memento": Method(sft=("expert", "agent"), rows=("memento", "sft"), expert="expert_sft", agent="agent_sft",
                      files=(("bank.pt", CaseBank.load),), play=play_memento),
    "gopo-noexpert": Method(sft=("flat",), rows=("gopo-noexpert", "sft-flat"), agent="flat", play=play_flat),
    "sft-flat": Method(agent="flat_sft", play=play_flat),        # a row of sft runs: the SFT flat agent
    "sft": checkpoint.METHODS["sft"]._replace(rows=("sft", "sft-flat")),
})


if __name__ == "__main__":
    if sys.argv[1:2] == ["eval"]:   # eval.py's command line, the baselines' methods known
        eval_lib.main(sys.argv[2:])
    else:
        main()

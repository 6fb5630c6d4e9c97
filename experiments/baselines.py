"""The baselines of the paper's comparison, and their command line: flat PPO (experiments/ppo.py),
Memento (experiments/memento.py) and, here, the no-Expert ablation.

    python -m experiments.baselines --method ppo --sft-from out/sft   # train.py's flags and stages, plus these
    python eval.py out/ppo                                             # evaluated as every run is

GOPO itself is gopo.py and `train.py --method sft` the SFT stages alone. Every method gets the same
budget after the same SFT data: `iters x scenarios x k` simulated dialogues on the same training
scenarios (train.train_loop), and each `*_iteration` returns one metrics.jsonl line from that
iteration's rollouts. The methods are declared in checkpoint.METHODS, which nothing changes.

gopo-noexpert, the ablation: GOPO's loss unchanged (gopo.preference_loss + lambda NLL of the
  winners, the same R, pairs and budget), but S(tau) sums the flat agent's reply-token log-probs,
  since there is no Expert and no strategy decision. R's ESNDCG reads the strategies the world
  recognises in the replies.
"""
import argparse
import copy
import time
import os
import sys

import cli

cli.process_env(sys.argv)   # before torch and transformers read it
import torch

import agent as agent_lib
import checkpoint
import gopo
import lm
import parallel
import train
import tse
from experiments import flat, memento, ppo


def flat_dpo_iteration(model, tok, opt, scenarios, event_values, world, args, it, seed):
    """The no-Expert ablation: GOPO's rollout -> R -> pairs -> trajectory DPO, on the flat agent's
    reply tokens. S(tau) = sum of its reply-token log-probs; the reference is the agent that sampled."""
    t0 = time.time()
    trajs = flat.flat_rollout((model, tok), scenarios, world, args, seed, args.rollouts)
    scores = [gopo.joint_reward(tr["record"], event_values, world.HORIZON, args.alpha) for tr in trajs]
    rewards = [m["R"] for m in scores]
    rollout_groups = [list(range(i * args.k, (i + 1) * args.k)) for i in range(len(scenarios))]
    said = lambda tr: [tr["agent_ids"][s:e] for s, e in flat.scored_replies(tr, args.segment)]   # noqa: E731
    pairs = gopo.build_pairs(rewards, rollout_groups, args.delta, args.max_pairs,
                             (lambda w, l: said(trajs[w]) != said(trajs[l])) if args.segment else None)
    losses, skipped = [], 0
    if pairs:
        used = sorted({i for p in pairs for i in p})
        row = {i: r for r, i in enumerate(used)}
        ids, attn, mask = (x.to(model.device) for x in flat.flat_batch([trajs[i] for i in used], tok.pad_token_id,
                                                                  after_branch=True, segment=args.segment))
        n_tokens = mask.sum(-1)                                                  # (N,)
        size = getattr(args, "device_batch_size", None)    # --device-batch-size: rows per forward
        with torch.no_grad():
            S_ref = agent_lib.reply_logps(model, ids, attn, mask) if not size else torch.cat(
                [agent_lib.reply_logps(model, ids[i:i + size], attn[i:i + size], mask[i:i + size])
                 for i in range(0, len(used), size)])                            # (N,)
        w = torch.tensor([row[a] for a, _ in pairs], device=model.device)
        l = torch.tensor([row[b] for _, b in pairs], device=model.device)
        model.train()
        for _ in range(args.gopo_epochs):
            if size:
                values = []
                if lm.guarded_step(model, opt, dpo_micro_losses(model, ids, attn, mask, n_tokens, S_ref, w, l, size,
                                                                args), values=values):
                    losses.append(sum(values))
                else:
                    skipped += 1
                continue
            S = agent_lib.reply_logps(model, ids, attn, mask)                    # (N,) eq. (2) on reply tokens
            pref, _, _ = gopo.preference_loss(S[w], S[l], S_ref[w], S_ref[l], args.beta)   # (P,) eq. (4)
            loss = (pref + args.nll_coef * -S[w] / n_tokens[w]).mean()           # eq. (4)
            if lm.guarded_step(model, opt, loss):
                losses.append(loss.item())
            else:
                skipped += 1
        model.eval()
    return {"iter": it, **flat.rollout_metrics(trajs, scores, world, t0, pairs, loss=tse.mean(losses) if losses else None,
                                               nonfinite_steps=skipped), "pairs": len(pairs)}


def dpo_micro_losses(model, ids, attn, mask, n_tokens, S_ref, w, l, size, args):
    """The ablation's loss in micro-batches of size // 2 pairs (at least one): each pair's rows scored
    together, each part summed over its pairs and divided by the pair count, so the parts add up to
    the batch's mean. A generator for lm.guarded_step."""
    per = max(1, size // 2)
    for i in range(0, len(w), per):
        rows = torch.cat([w[i:i + per], l[i:i + per]])                          # (2p,) winners then losers
        S = agent_lib.reply_logps(model, ids[rows], attn[rows], mask[rows])      # (2p,)
        p = len(rows) // 2
        pref, _, _ = gopo.preference_loss(S[:p], S[p:], S_ref[rows[:p]], S_ref[rows[p:]], args.beta)   # (p,)
        yield (pref + args.nll_coef * -S[:p] / n_tokens[rows[:p]]).sum() / len(w)


# ----------------------------------------------------------------------------- the command line
BASELINES = {"ppo": "flat agent, token-level PPO", "memento": "case bank over the frozen SFT agents",
             "gopo-noexpert": "GOPO's loss on a flat agent"}


def parser():
    """train.py's command line with the baselines as its --method, and their own flags."""
    assert set(BASELINES) == set(checkpoint.methods_of("experiments.baselines"))
    p = train.parser(list(BASELINES), default=False,
                     method_help="the baseline: " + "; ".join(f"{a} ({what})" for a, what in BASELINES.items()))
    p.description = __doc__.split("\n")[0]
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
    return p


def check_flags(args):
    """The baselines' own conflicts (train.check_flags has run): one line, exit 2."""
    if args.lora_r:
        cli.die(f"--lora-r is for train.py's gopo and sft (the two agents); --method {args.method} trains every weight")
    if args.fsdp:
        cli.die(f"--method {args.method} runs without FSDP (in one process; --bf16 gives it bf16 compute); drop --fsdp")
    if parallel.n_ranks() > 1:
        cli.die(f"--method {args.method} runs in one process (only train.py's gopo and sft are distributed); drop torchrun")
    if args.resume:
        cli.die(f"--resume continues train.py's gopo and sft runs only; start the {args.method} run again "
                "(baselines take a few minutes)")
    if args.mix:
        cli.die(f"--mix is for train.py's gopo (independent groups mixed into branch or fork groups); --method "
                f"{args.method} plays one kind of group")
    if args.rollouts == "fork":
        cli.die("--rollouts fork takes the runner-up of the Expert's decision; a flat agent makes none: use "
                "--rollouts independent or branch")
    if args.rollouts == "branch" and args.method != "gopo-noexpert":
        cli.die(f"--rollouts branch is for GOPO's preference pairs (gopo, gopo-noexpert); --method {args.method} "
                "plays independent rollouts")
    if args.method == "gopo-noexpert" and args.k < 2:   # ppo and memento learn from one rollout per scenario too
        cli.die(f"--k must be >= 2 for --method gopo-noexpert: a preference pair compares two rollouts of one "
                f"scenario, got {args.k}")
    if args.method == "ppo" and args.agent_temperature == 0:
        cli.die("--method ppo needs sampled rollouts: --agent-temperature must be > 0 (it is the policy's temperature)")


def main(argv=None):
    """train.py's stages, with the baseline's step and checkpoint writer."""
    p = parser()
    run = train.open_run(p, *train.parse(p, argv, check_flags))
    train.load_logs(run)
    models = train.run_sft(run, train.build_models(run))
    step, save = trainer(run, models)
    train.train_loop(run, step)
    save(run.dir)
    train.save_outputs(run)


def trainer(run, models):
    """A baseline's (step(scenarios, it, seed) -> metrics line, save(run_dir)) for train.train_loop.
    models: the placed SFT models, the flat agent for ppo and gopo-noexpert, both agents for memento."""
    method, args, event_values, world = run.args.method, run.args, run.event_values, run.world
    if method == "ppo":
        agent_model, tok_a = models["flat"]
        ref_model = copy.deepcopy(agent_model).eval()           # the frozen SFT flat agent (KL penalty)
        value_head = ppo.ValueHead(agent_model.config.hidden_size).to(run.device)
        opt = torch.optim.AdamW([*agent_model.parameters(), *value_head.parameters()], lr=args.flat_lr,
                                weight_decay=0.0)

        def save(run_dir):
            checkpoint.save_model(agent_model, tok_a, os.path.join(run_dir, "flat"))
            torch.save(value_head.state_dict(), os.path.join(run_dir, "value_head.pt"))
        return (lambda scenarios, it, seed: ppo.ppo_iteration(agent_model, value_head, ref_model, tok_a, opt, scenarios,
                                                          event_values, world, args, it, seed)), save
    if method == "gopo-noexpert":
        agent_model, tok_a = models["flat"]
        opt = torch.optim.AdamW(agent_model.parameters(), lr=args.flat_lr, weight_decay=0.0)
        return (lambda scenarios, it, seed: flat_dpo_iteration(agent_model, tok_a, opt, scenarios, event_values, world,
                                                               args, it, seed)), \
            (lambda run_dir: checkpoint.save_model(agent_model, tok_a, os.path.join(run_dir, "flat")))
    if method == "memento":
        (expert_model, tok_e), (agent_model, tok_a) = models["expert"], models["agent"]
        bank = memento.CaseBank.from_logs(run.logs, world.STRATEGIES, args.memento_k, args.memento_decay)
        if args.memento_logs:
            bank.add(run.logs, event_values, world.HORIZON)
        return (lambda scenarios, it, seed: memento.memento_iteration(expert_model, agent_model, tok_e, tok_a, bank, scenarios,
                                                              event_values, world, args, it, seed)), \
            (lambda run_dir: torch.save(bank.state_dict(), os.path.join(run_dir, "bank.pt")))
    raise ValueError(f"not a baseline: {method}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["eval"]:   # the old way to evaluate a baseline's run: eval.py knows every method now
        import eval as eval_lib
        eval_lib.main(sys.argv[2:])
    else:
        main()

"""The CS Agent's ceiling: the clairvoyant oracle chooses every strategy, a run's CS Agent writes every reply.

    python -m experiments.cs_ceiling out/desk-sft            # its SFT'd CS Agent, 100 held-out customers
    python -m experiments.cs_ceiling out/gopo --agent agent --n 200

With template replies the oracle succeeds on every customer, so the success printed here is what
the CS Agent's writing allows, whatever the Expert chooses: the first thing to check when a method
is stuck far below the oracle (docs/log.md, "the desk's CS Agent copies slots").
"""
import argparse
import collections
import json
import os
import random

import torch

import data
import eval as eval_lib
import lm
import rollout as rollout_lib


class OracleDialogues(rollout_lib.ExpertDialogues):
    """The Expert's seat taken by the world's oracle policy, fed the dialogue as the world's tracker reads it."""

    def decide(self, logits, allowed, uniforms, live):
        w, out = self.world, []
        for i in live:
            turns = self.trajs[i]["turns"]
            tr = w.Tracker()
            tr.update(None, turns[0]["text"], "disclose")
            for agent_turn, customer_turn in zip(turns[1::2], turns[2::2]):
                tr.update(agent_turn["strategy"], customer_turn["text"], customer_turn["event"])
            out.append(w.STRATEGIES.index(w.POLICIES["oracle"](tr, self.scenarios[i], random.Random(0))))
        return torch.tensor(out), torch.zeros(len(out))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder of train.py on a built-in world")
    p.add_argument("--agent", default="agent_sft", help="which CS Agent of the run: agent_sft or agent")
    p.add_argument("--n", type=int, default=100, help="held-out customers")
    args = p.parse_args(argv)
    if args.n < 1:
        eval_lib.die(f"--n must be at least 1, got {args.n}")
    try:
        with open(os.path.join(args.run, "config.json")) as f:
            config = json.load(f)
        if config.get("data", "shop") != "shop":
            eval_lib.die(f"{args.run}: a run on --data {config['data']}; the oracle lives in the built-in worlds")
        world = eval_lib.world_of(config, args.run)
        expert, tok_e = lm.load(os.path.join(args.run, "expert_sft"))   # its context only; the oracle decides
        agent, tok_a = lm.load(os.path.join(args.run, args.agent))
    except (OSError, ValueError) as e:
        eval_lib.die(f"{args.run}: not a finished train.py run with expert_sft/ and {args.agent}/ ({str(e).splitlines()[0]})")
    scenarios = [world.make_scenario(s) for s in data.test_seeds(args.n)]
    with torch.no_grad():
        trajs = OracleDialogues(expert, agent, tok_e, tok_a, scenarios, world).play(greedy=True)
    success = sum(t["record"]["success"] for t in trajs) / len(trajs)
    print(f"{args.run} {args.agent}: oracle strategies, this CS Agent's replies: success {success:.3f} "
          f"on {args.n} held-out customers")
    reactions = collections.Counter((a["strategy"], c["text"]) for t in trajs
                                    for a, c in zip(t["record"]["turns"][1::2], t["record"]["turns"][2::2]))
    print("most frequent (strategy, customer's answer):")
    for (z, text), n in reactions.most_common(8):
        print(f"  {n:4d}  {z:<18} {text}")


if __name__ == "__main__":
    main()

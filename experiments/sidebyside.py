"""Another tree's rollout against this one's, in one process: the same models and batch, interleaved.

    git worktree add /tmp/before <commit> && python -m experiments.sidebyside /tmp/before --run out/gopo

This machine is shared and noisy, so two trees' `experiments.bench` runs, one after the other, differ
by more than a small change. Here OLD's engine.py, expert.py and rollout.py are loaded beside this
tree's (the rest, lm.py and the worlds, is this tree's), and both play the bench's rollout batch
(--scenarios x --k sampled dialogues, seed 1), alternating which goes first, --repeats times after
a warm-up. Prints each one's median seconds, their ratio, and whether the two played the same
dialogues (the same turns and ids; the recorded log-probs' largest difference).
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning threads stall a shared CPU
import torch

import data
import lm
import rollout as rollout_lib
from experiments.bench import run_world

p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
p.add_argument("old", help="the other tree (a checkout of another commit)")
p.add_argument("--run", required=True, help="the train.py run whose expert/ and agent/ both trees play")
p.add_argument("--repeats", type=int, default=5, help="timed repeats of each (median reported)")
p.add_argument("--scenarios", type=int, default=16, help="scenarios per rollout batch")
p.add_argument("--k", type=int, default=4, help="rollouts per scenario")
p.add_argument("--threads", type=int, default=1, help="torch CPU threads")


def load_rollout(root):
    """root's rollout module, with root's engine and expert under it (sys.modules as it was after)."""
    names = ("engine", "expert", "rollout")               # in import order: each sees the ones before
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for name in names:
            spec = importlib.util.spec_from_file_location(name, os.path.join(root, name + ".py"))
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
        return module
    finally:
        for n, m in saved.items():
            sys.modules[n] = m


def main():
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    old = load_rollout(args.old)
    expert, agent = lm.load(os.path.join(args.run, "expert")), lm.load(os.path.join(args.run, "agent"))
    _, world = run_world(args.run)
    batch = [s for s in (world.make_scenario(s) for s in data.train_seeds(args.scenarios, offset=50_000))
             for _ in range(args.k)]
    trees = {"old": old, "this": rollout_lib}
    played = {name: m.rollout(expert, agent, batch, world, seed=1) for name, m in trees.items()}   # warm-up
    same = all(a["record"]["turns"] == b["record"]["turns"] and (a["ids"], a["agent_ids"]) == (b["ids"], b["agent_ids"])
               for a, b in zip(played["old"], played["this"]))
    diff = max((abs(x - y) for a, b in zip(played["old"], played["this"]) for x, y in zip(a["ref_logps"], b["ref_logps"])),
               default=0.0)
    times = {name: [] for name in trees}
    for r in range(args.repeats):
        for name in (("old", "this") if r % 2 == 0 else ("this", "old")):
            t0 = time.perf_counter()
            trees[name].rollout(expert, agent, batch, world, seed=1)
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{len(batch)} dialogues, {args.repeats} interleaved repeats, {args.threads} thread(s): "
          f"{args.old} {med['old']:.3f} s, this tree {med['this']:.3f} s (median), this / old = {med['this'] / med['old']:.3f}; "
          f"all times old {[round(t, 3) for t in times['old']]}, this {[round(t, 3) for t in times['this']]}")
    print(f"same dialogues: {same}; recorded log-probs differ by at most {diff:.2e}")


if __name__ == "__main__":
    main()

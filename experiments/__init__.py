"""Experiment machinery around the method: the baselines (PPO, Memento, the no-Expert ablation),
the comparison and its script, the speed benchmark. Run from the repo root, e.g.
`python -m experiments.compare out/compare/*`. Nothing at the top level depends on this folder
except the lazy `--algo` dispatch in train.py and eval.py (the baselines share their stages)."""

"""Experiment machinery around the method: the baselines (PPO, Memento, the no-Expert ablation)
with their command line, the comparison and its script, the speed benchmark. Run from the repo
root, e.g. `python -m experiments.baselines --algo ppo ...`, `python -m experiments.compare
out/compare/*`. Dependencies run one way: this folder imports the top-level modules (train.py's
stages, checkpoint.METHODS, which baselines.py extends, rollout.Dialogues); nothing at the top
level imports this folder."""

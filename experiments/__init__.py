"""Experiment machinery around the method: the baselines, one method per file (flat.py: the flat
agent; ppo.py; memento.py; baselines.py: the no-Expert ablation and the command line,
`python -m experiments.baselines --method ppo ...`), the comparison and its script, the ceilings
probe, the speed benchmark. Run from the repo root. Dependencies run one way: this folder imports
the top-level modules (train.py's stages, checkpoint.METHODS, rollout.Dialogues); nothing at the top
level imports this folder, and nothing here changes a top-level module's globals."""

"""--report-to: each metrics.jsonl line mirrored to an experiment tracker, where users of TRL look.

    python train.py --report-to tensorboard      # out/<run>/tensorboard/; tensorboard --logdir out/<run>

metrics.jsonl stays the record (eval.py, plots and --resume read it); a tracker gets a copy of each
line's numbers under TRL's names, "train/" + the key (train/loss, train/rewards/chosen, ...: the keys
are TRL's already), at step = the iteration. Each tracker is an optional dependency, imported only
when chosen, and checked before anything is written (`check`). tensorboard is tested (its event files
read back, tests/test_tracking.py); trackio and wandb are written to their documented API and untested
here (docs/cli.md says what each costs to install).
"""
import math

import cli

TRACKERS = ("none", "tensorboard", "trackio", "wandb")
PACKAGE = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}


def check(name):
    """One line and exit 2 if the tracker's package is not installed (before anything is written)."""
    if name == "none":
        return
    try:
        __import__(PACKAGE[name])
    except ImportError:
        cli.die(f"--report-to {name}: the {PACKAGE[name]} package is not installed (pip install {PACKAGE[name]}; "
                "docs/cli.md lists what each tracker costs)")


def scalars(m):
    """A metrics.jsonl line -> {TRL name: float}: its finite numbers, "iter" being the step."""
    return {f"train/{k}": float(v) for k, v in m.items()
            if k != "iter" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """Tracker(name, run_dir, config).log(metrics line) for each iteration, then .close()."""

    def __init__(self, name, run_dir, config):
        self.name, self.writer = name, None
        project, run = "gopo", run_dir.rstrip("/").rsplit("/", 1)[-1]
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=f"{run_dir}/tensorboard")
        elif name == "trackio":   # untested here: the module logs (trackio.log, trackio.finish)
            import trackio
            trackio.init(project=project, name=run, config=config, resume="allow")
            self.writer = trackio
        elif name == "wandb":     # untested here
            import wandb
            self.writer = wandb.init(project=project, name=run, config=config, dir=run_dir, resume="allow")

    def log(self, m):
        values, step = scalars(m), m["iter"]
        if self.name == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        elif self.name in ("trackio", "wandb"):
            self.writer.log(values, step=step)

    def close(self):
        if self.name == "tensorboard":
            self.writer.close()
        elif self.name in ("trackio", "wandb"):
            self.writer.finish()

"""What every command line here shares: one-line errors (exit 2, nothing written) and checked numbers."""
import argparse
import math
import os
import sys


def process_env(argv):
    """What an entry script sets before it imports torch and transformers, which read it once:
    OMP_WAIT_POLICY=PASSIVE (spinning threads stall a shared CPU) and, unless --no-offline is in
    argv, the Hugging Face offline switches (a missing model fails at once, with no hub retries).
    Only the process environment changes, and only where the user has not set it."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "--no-offline" not in argv:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def die(message):
    """One line on stderr, named after the running script, and exit 2."""
    print(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints the whole usage otherwise)."""

    def __init__(self, doc, **kwargs):
        super().__init__(description=doc.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                         **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def checked(kind, lo, lo_ok, hi=None):
    """argparse type: a finite number in [lo, hi] (lo excluded unless lo_ok)."""
    def parse(s):
        try:
            v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{s}' is not a number") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {s}")
        if v < lo or (v == lo and not lo_ok) or (hi is not None and v > hi):
            bound = f"{'>=' if lo_ok else '>'} {lo}" + (f" and <= {hi}" if hi is not None else "")
            raise argparse.ArgumentTypeError(f"must be {bound}, got {s}")
        return v
    return parse


def int_list(s):
    """argparse type: "1,2,3" -> [1, 2, 3], each an integer > 0."""
    try:
        out = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{s}' is not a comma-separated list of integers") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected integers > 0, got '{s}'")
    return list(out)


def positive(kind):
    return checked(kind, 0, False)


def nonneg(kind):
    return checked(kind, 0, True)

"""docs/cli.md names every flag of the three command lines.

Why a test: a flag added to a parser and not to the page is invisible to anyone who reads the page
instead of `--help`. The flags are read from the real `--help` of train.py, eval.py and
`python -m experiments.baselines` (run from the repo root with this interpreter), so the test
follows the parsers, not a copy of them. A help flag counts as documented when docs/cli.md holds it
as a whole word (`--lr` is not found inside `--lr-cs`); `-h`/`--help` is exempt, and the negation
`--no-X` of a boolean flag (argparse lists `--X, --no-X` together) is covered by `--X`. Only
help ⊆ page is checked: the page may also name an old spelling the parser accepts without
listing it (a deprecated alias).
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
COMMANDS = {
    "train.py": ["train.py"],
    "eval.py": ["eval.py"],
    "python -m experiments.baselines": ["-m", "experiments.baselines"],
}
FLAG = re.compile(r"(?<![\w-])--[A-Za-z0-9](?:[\w-]*\w)?")   # --name, never ending in a hyphen
OPTION_LINE = re.compile(r"^(?P<indent> *)-")                  # an option's line in the help, or a help line that starts with one


def help_flags(text):
    """The long flags a --help text defines: those of the usage block and those that open an
    option's entry in the option list (its invocation, before the help text, which argparse
    separates by two or more spaces or a line break). Help text that merely mentions a flag
    (a continuation line such as '   --rollouts branch: ...') is indented deeper than any entry
    and is not read."""
    usage, rest = re.split(r"\n\s*\n", text, maxsplit=1) if "\n\n" in text else (text, "")
    flags = set(FLAG.findall(usage)) if usage.lstrip().startswith("usage:") else set()
    entries = [(len(m["indent"]), line) for line in rest.splitlines() if (m := OPTION_LINE.match(line))]
    if entries:
        indent = min(i for i, _ in entries)
        for i, line in entries:
            if i == indent:
                flags |= set(FLAG.findall(re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]))
    return flags - {"--help"}


def undocumented(flags, doc_flags):
    """The flags the page does not name, a boolean's --no-X covered by its --X."""
    return sorted(f for f in flags if f not in doc_flags
                  and not (f.startswith("--no-") and "--" + f[5:] in flags and "--" + f[5:] in doc_flags))


@pytest.fixture(scope="module")
def helps():
    """{command: its --help text}, the three run side by side."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {name: subprocess.Popen([sys.executable, *args, "--help"], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, args in COMMANDS.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help exited {proc.returncode}:\n{stderr[-2000:]}"
        out[name] = stdout
    return out


def test_help_parsing_reads_every_entry(helps):
    """A guard on the parser of the help text: it finds flags every command has, and as many as
    the usage line lists (so a change in argparse's layout cannot hide flags from the next test)."""
    for name, text in helps.items():
        flags = help_flags(text)
        assert {"--seed", "--device", "--bf16"} <= flags, (name, sorted(flags))
        usage = re.split(r"\n\s*\n", text, maxsplit=1)[0]
        assert set(FLAG.findall(usage)) - {"--help"} <= flags, (name, sorted(flags))
    assert {"--iters", "--lr", "--lr-cs", "--no-offline"} <= help_flags(helps["train.py"])
    assert {"--n-scenarios", "--show"} <= help_flags(helps["eval.py"])
    assert {"--flat-lr", "--memento-k"} <= help_flags(helps["python -m experiments.baselines"])
    assert "--rollouts" not in help_flags(helps["eval.py"])


def test_help_parsing_is_robust_to_layout():
    """Invocation on its own line, help on the same line, help that starts with a flag, a wrapped
    mention of a flag, a boolean pair, choices and metavars."""
    text = ("usage: x.py [-h] [--alpha A] [--on | --no-on]\n               [--pick {a,b}]\n\n"
            "options:\n  -h, --help            show this help message and exit\n"
            "  --alpha A             --beta-like text: not a flag of its own (default: 1)\n"
            "  --on, --no-on         a boolean\n"
            "  --pick {a,b}\n                        --gamma: mentioned, with --no-\n                        delta wrapped\n"
            "\ngroup:\n  --very-long-flag-name VERY_LONG_FLAG_NAME\n                        help\n")
    assert help_flags(text) == {"--alpha", "--on", "--no-on", "--pick", "--very-long-flag-name"}
    assert undocumented(help_flags(text), {"--alpha", "--on", "--pick"}) == ["--very-long-flag-name"]


def test_cli_doc_names_every_flag(helps):
    doc_flags = set(FLAG.findall(DOC.read_text(encoding="utf-8")))
    missing = {name: undocumented(help_flags(text), doc_flags) for name, text in helps.items()}
    missing = {name: flags for name, flags in missing.items() if flags}
    assert not missing, "docs/cli.md does not mention these flags of their --help:\n" + "\n".join(
        f"  {name}: {' '.join(flags)}" for name, flags in missing.items())

"""Every cross-reference in the code and the docs resolves.

Why a test: sections get renamed and pages split (the README's notebook moved to docs/), and a
reference to a section that no longer exists reads as fine until someone follows it. The scan is
static text: every *.py file (top level, experiments/, worlds/, tools/, tests/) and every *.md file
(README.md, docs/), this file excepted (it spells out the forms it looks for). What counts as a
reference, and where it must point:

- a section of the README: README, README's or README.md followed by a quoted name (a comment's
  double quotes, or the escaped ones of a string literal); the name must be a heading of README.md;
- a section of a doc: a docs/NAME.md path followed by a quoted name, with or without a comma
  between them; the name must be a heading of that doc, or a bold run-in head that opens one of
  its paragraphs (not a list item's);
- see followed by a quoted name: in a .md file, a heading of that page or of README.md, or a bold
  run-in head of one of that page's paragraphs; in a .py file, a heading of README.md, and only
  names that start with a capital letter count (section names do; a lower-case one, such as a test
  case's key, is not a section);
- in followed by a quoted name, in a .md file only, where the name starts with a capital letter and
  does not end a sentence (a quoted customer's line does): as see;
- a vague reference, "the README's" followed by anything but a quoted name: it names no section,
  so it is reported (say which section);
- a path docs/NAME.md, optionally with #anchor, anywhere but as a Markdown link's target (relative
  to the repo root): the file must exist and the anchor must be the GitHub slug of one of its headings;
- a Markdown link or image in a .md file (relative to that file; #anchor alone is the page
  itself): the same checks; web addresses are not followed;
- a path docs/img/NAME.png (or .jpg, .svg, .gif), likewise: the file must exist.

A quoted name matches a heading (any level, outside fenced code) when it equals, ignoring case,
backticks and repeated spaces, the whole heading, the heading without a trailing parenthetical
("The service desk" for "The service desk (`WORLD=desk ...`)"), or the part before its first colon
("Real data" for "Real data: MG-ShopDial, ...").
"""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY_DIRS = ("experiments", "worlds", "tools", "tests")
SELF = Path(__file__).resolve()

# a quoted section name: straight or curly double quotes, optionally backslash-escaped (inside a
# Python string literal); the name starts with a letter, digit or backtick and stays on one line
QUOTED = r"""\\?["\u201c](?P<name>[\w`][^"\u201c\u201d\\\n]{0,99})\\?["\u201d]"""
SEP = r"[ \t]*,?[ \t]*\n?[ \t#*/>-]*"   # between a page and its quoted section: blanks, a comma, a line break
README_SECTION = re.compile(r"(?<![\w/.-])README(?:\.md)?(?:'s)?" + SEP + QUOTED)
DOC_PATH = re.compile(r"(?<![\w/.-])(?<!\]\()(?P<path>docs/[\w.-]+\.md)(?:#(?P<anchor>[\w-]+))?(?:" + SEP + QUOTED + ")?")
SEE_SECTION = re.compile(r"(?<![\w-])[Ss]ee[ \t]*\n?[ \t#*/>-]*" + QUOTED)
IN_SECTION = re.compile(r"(?<![\w-])in[ \t]*\n?[ \t>]*" + QUOTED)      # .md files only
LEAD = re.compile(r"(?:\A|\n[ \t>]*\n)[ \t>]*\*\*(?P<text>[^*\n]+)\*\*")   # a paragraph's, not a list item's
VAGUE_README = re.compile(r"\b[Tt]he README's(?!" + SEP + QUOTED + r")[ \t]+[\w-]+(?:[ \t]+[\w-]+)?")
IMAGE_PATH = re.compile(r"(?<![\w/.-])(?<!\]\()docs/img/[\w.-]+\.(?:png|jpe?g|svg|gif)\b")
MD_LINK = re.compile(r"!?\[[^\]\n]*(?:\n[^\]\n]*)?\]\((?P<target>[^)\s]+)(?:[ \t]+\"[^\"]*\")?\)")
HEADING = re.compile(r"^ {0,3}#{1,6}[ \t]+(?P<text>.*?)[ \t]*#*[ \t]*$")
FENCE = re.compile(r"^ {0,3}(```|~~~)")


def source_files():
    """Every .py and .md file the scan reads, as paths relative to the repo root."""
    files = sorted(ROOT.glob("*.py"))
    for d in PY_DIRS:
        files += sorted(p for p in (ROOT / d).rglob("*.py") if "__pycache__" not in p.parts)
    files += [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))
    return [p for p in files if p.is_file() and p.resolve() != SELF]


def headings(path, text=None, _cache={}):
    """The headings of a Markdown file (or of its given text), in order, outside fenced code."""
    key = Path(path).resolve()
    if text is not None or key not in _cache:
        out, fenced = [], False
        for line in (key.read_text(encoding="utf-8") if text is None else text).splitlines():
            if FENCE.match(line):
                fenced = not fenced
            elif not fenced and (m := HEADING.match(line)):
                out.append(m.group("text"))
        if text is not None:
            return out
        _cache[key] = out
    return _cache[key]


def _norm(s):
    return " ".join(s.replace("`", "").replace("*", "").split()).casefold()


def names(heading):
    """The names a quoted reference may use for a heading."""
    h = _norm(heading)
    out = {h}
    if (bare := re.sub(r"\s*\([^()]*\)$", "", h)) != h:
        out.add(bare)
    if ":" in h:
        out.add(h.split(":", 1)[0].strip())
    return out


def has_section(path, name, text=None):
    return any(_norm(name) in names(h) for h in headings(path, text))


def has_lead(path, name, text=None):
    """A bold run-in head that opens a paragraph ("**What we found, and why ...**"), whole or up to
    its first comma, colon or full stop. A list item's bold opening is not one."""
    text = Path(path).read_text(encoding="utf-8") if text is None else text
    for m in LEAD.finditer(text):
        lead = _norm(m["text"])
        if _norm(name) in {lead, lead.rstrip(".:"), re.split(r"[,:.]", lead)[0].strip()}:
            return True
    return False


def slugs(path, text=None):
    """GitHub's anchors for the headings of a Markdown file: lower case, punctuation dropped,
    spaces to hyphens, repeats numbered -1, -2, ..."""
    seen, out = {}, set()
    for h in headings(path, text):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", h)            # a link's text only
        s = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def check_path(target, anchor, base):
    """None when `target` (relative to `base`) exists and has the anchor, else why not."""
    path = (base / target).resolve() if target else None
    if path is not None and not path.exists():
        return f"no file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
    if anchor and path is not None and path.suffix == ".md" and anchor not in slugs(path):
        return f"no heading with anchor #{anchor} in {path.relative_to(ROOT)}"
    return None


def references(path, text=None):
    """[(line, text of the reference, problem or None)] for one file (or for `text` as if it were
    that file's), in the order they appear."""
    path = Path(path)
    rel = path.resolve().relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path
    text = path.read_text(encoding="utf-8") if text is None else text
    is_md = path.suffix == ".md"
    readme = ROOT / "README.md"
    found = []

    def add(m, problem):
        found.append((m.start(), text.count("\n", 0, m.start()) + 1, " ".join(m.group(0).split()), problem))

    for m in README_SECTION.finditer(text):
        add(m, None if has_section(readme, m["name"]) else f'README.md has no section "{m["name"]}"')
    for m in DOC_PATH.finditer(text):
        problem = check_path(m["path"], m["anchor"], ROOT)
        if problem is None and m["name"] and not (has_section(ROOT / m["path"], m["name"])
                                                   or has_lead(ROOT / m["path"], m["name"])):
            problem = f'{m["path"]} has no section "{m["name"]}"'
        add(m, problem)
    for m in SEE_SECTION.finditer(text):
        if is_md:
            ok = has_section(path, m["name"], text) or has_lead(path, m["name"], text) or has_section(readme, m["name"])
            add(m, None if ok else f'neither {rel} nor README.md has a section "{m["name"]}"')
        elif m["name"][0].isupper():
            add(m, None if has_section(readme, m["name"]) else f'README.md has no section "{m["name"]}"')
    for m in IN_SECTION.finditer(text) if is_md else ():
        if m["name"][0].isupper() and m["name"][-1] not in ".?!":
            ok = has_section(path, m["name"], text) or has_lead(path, m["name"], text) or has_section(readme, m["name"])
            add(m, None if ok else f'neither {rel} nor README.md has a section "{m["name"]}"')
    for m in VAGUE_README.finditer(text):
        add(m, "names no section of the README (quote the heading, or point at the doc that holds it)")
    for m in IMAGE_PATH.finditer(text):
        add(m, check_path(m.group(0), None, ROOT))
    if is_md:
        for m in MD_LINK.finditer(text):
            target = m["target"]
            if re.match(r"^[a-zA-Z][\w+.-]*:", target):      # https:, mailto:, ...
                continue
            file, _, anchor = target.partition("#")
            if not file:
                problem = None if anchor in slugs(path, text) else f"no heading with anchor #{anchor} in {rel}"
            else:
                problem = check_path(file, anchor, path.parent)
            add(m, problem)
    return [r[1:] for r in sorted(found, key=lambda r: r[0])]


def test_every_reference_resolves():
    every, broken = 0, []
    for path in source_files():
        rel = path.relative_to(ROOT)
        for line, ref, problem in references(path):
            every += 1
            if problem:
                broken.append(f"{rel}:{line}: {ref}  ->  {problem}")
    assert every >= 40, f"only {every} references found: the patterns have stopped matching"
    assert not broken, f"{len(broken)} of {every} references do not resolve:\n" + "\n".join(broken)


def _ok_by_line(refs):
    """{line: [True where a reference resolves, False where not, in the order they appear]}"""
    out = {}
    for line, _, problem in refs:
        out.setdefault(line, []).append(problem is None)
    return out


def test_the_patterns_find_each_kind():
    """The scan sees each form (a guard against patterns that silently match nothing) and does not
    take look-alikes for references."""
    readme_heading = headings(ROOT / "README.md")[1]          # e.g. "Quick start"
    doc = ROOT / "docs" / "real-data.md"
    doc_heading = headings(doc)[-1]
    anchor = sorted(slugs(doc))[0]
    py_text = "\n".join([
        f'# ok: (README "{readme_heading}")',
        f"die(f\"... (see README \\\"{readme_heading}\\\")\")",
        '# broken: README "No such section"',
        "# broken: README's \"No such section\"",
        f'# ok: docs/real-data.md, "{doc_heading}"',
        '# broken: (docs/real-data.md, "No such section")',
        f"# ok: docs/real-data.md#{anchor}",
        "# broken: docs/real-data.md#no-such-anchor, docs/no-such-page.md",
        "# ok: docs/img/curves.png; broken: docs/img/no-such.png",
        "# broken: measured in the README's notes",
        '# no reference but one that resolves: (see "help"), open("docs/cli.md"), "compare.md", "x"',
        f'# ok: see "{readme_heading}"; broken: see "No such section"',
        "# none: README example, README's spelling, the README, xdocs/cli.md",
    ]) + "\n"
    got = _ok_by_line(references(ROOT / "x.py", py_text))
    assert got == {1: [True], 2: [True], 3: [False], 4: [False], 5: [True], 6: [False], 7: [True],
                   8: [False, False], 9: [True, False], 10: [False], 11: [True], 12: [True, False]}, got

    md_text = "\n".join([                                     # links resolve relative to docs/
        "# Probe heading",
        "[ok](results.md) ![ok](img/curves.png) [ok](#probe-heading) [ok](../README.md#quick-start)",
        "[broken](img/no-such.png) [broken](#no-such) [broken](docs/results.md) [web](https://example.com/x)",
        'ok: (see "Probe heading"), (see "Quick start"); broken: (see "Baselines")',
        '', '**Run-in head, more.** ok: in "Run-in head", in\n"Quick start"; broken: in "Baselines"; none: in "Yes?"',
        '- **Item** broken: see "Item"',
        '```', '# a comment in code, not a heading', '```', '[broken](#a-comment-in-code-not-a-heading)',
    ]) + "\n"
    got = _ok_by_line(references(ROOT / "docs" / "_probe.md", md_text))
    assert got == {2: [True] * 4, 3: [False] * 3, 4: [True, True, False], 6: [True, True], 7: [False],
                   8: [False], 12: [False]}, got

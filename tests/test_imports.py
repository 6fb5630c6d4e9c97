"""The project's own imports run one way: no module reaches itself through its imports.

Why a test: a circle is easy to add (one function-level `import` is enough) and hard to see, and it
ties together what a fork should be able to replace alone (a world, the record schema) or read
alone (the distributed code). The walk is static (`ast`, nothing is imported) and counts every
import statement, at module level or inside a function, resolved to the project's own modules:
top-level *.py files and the modules of its folders (experiments/, worlds/, tools/, ...), tests/
excepted. `from package import name` counts as importing package.name where that is a module,
else the package. A package's parent __init__ that Python runs on the way is not counted: it is no
import the code asks for.
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP = {"tests", "docs", "out", "runs", "models"}


def project_modules(root=ROOT):
    """{module name: file} for the top-level .py files and every .py file under a folder of the
    repo (not hidden, not tests/ or outputs); a folder's __init__.py is the folder's module."""
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")) and not (not parts and d in SKIP))
        for f in sorted(filenames):
            if f.endswith(".py"):
                name = parts if f == "__init__.py" else parts + [f[:-3]]
                if name:
                    modules[".".join(name)] = os.path.join(dirpath, f)
    return modules


def imports_of(name, path, modules):
    """The project modules that the file of module `name` imports, anywhere in it."""
    is_package = os.path.basename(path) == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()

    def deepest(dotted):   # `import a.b.c` runs a, a.b, a.b.c: the deepest project module stands for them
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            if ".".join(parts[:n]) in modules:
                return ".".join(parts[:n])
        return None

    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            targets = [deepest(a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:     # relative: strip level - 1 packages off the current one
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            dotted = [".".join(filter(None, (base, a.name))) for a in node.names]
            targets = [d if d in modules else deepest(base) if base else None for d in dotted]
        else:
            continue
        found |= {t for t in targets if t and t != name}
    return found


def import_graph(root=ROOT):
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def circles(graph):
    """(one circle [a, b, ..., a], every module of the knot) per strongly connected component of more
    than one module (Tarjan): the circle to print, and all that must change to untie it."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append((circle_in(graph, set(comp)), sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def circle_in(graph, comp):
    """A shortest path from the component's first module back to itself, inside the component."""
    start = min(comp)
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop(0)
        for w in sorted(graph[path[-1]] & comp):
            if w == start:
                return path + [start]
            if w not in seen:
                seen.add(w)
                paths.append(path + [w])
    return sorted(comp)


def test_the_walk_sees_function_level_relative_and_package_imports(tmp_path):
    for rel, text in {"a.py": "import b\n", "b.py": "def f():\n    from pkg import c\n",
                      "pkg/__init__.py": "from . import c\n", "pkg/c.py": "from .. import a\n",
                      "pkg/sub/__init__.py": "", "pkg/sub/d.py": "from ..c import x\nimport pkg.sub\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    graph = import_graph(str(tmp_path))
    assert graph == {"a": {"b"}, "b": {"pkg.c"}, "pkg": {"pkg.c"}, "pkg.c": {"a"}, "pkg.sub": set(),
                     "pkg.sub.d": {"pkg.c", "pkg.sub"}}
    assert circles(graph) == [(["a", "b", "pkg.c", "a"], ["a", "b", "pkg.c"])]


def test_the_project_imports_run_one_way():
    graph = import_graph()
    assert len(graph) > 10, sorted(graph)          # the walk found the project
    found = circles(graph)
    assert not found, "import circles:\n" + "\n".join(f"  {' -> '.join(c)}   (the knot: {', '.join(k)})"
                                                      for c, k in found)


# ----------------------------------------------------------------------------- no hidden coupling
MUTATORS = {"update", "append", "extend", "insert", "pop", "setdefault", "clear", "remove", "add", "discard",
            "add_argument", "add_argument_group", "set_defaults", "__setitem__"}


def module_level(tree):
    """The statements a module runs when imported: its body, not the bodies of its functions and
    classes (an `if __name__ == "__main__":` block runs only as a script, so it is left out too)."""
    def walk(stmts):
        for s in stmts:
            if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            if isinstance(s, ast.If) and "__main__" in ast.unparse(s.test):
                continue
            yield s
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from walk(getattr(s, field, []) or [])
    return list(walk(tree.body))


def imported_names(tree, modules):
    """{local name: project module} of the file's module-level `import x [as y]` / `from p import m`."""
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in modules or a.name.split(".")[0] in modules:
                    names[a.asname or a.name.split(".")[0]] = a.name
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            for a in node.names:
                if f"{node.module}.{a.name}" in modules or node.module in modules:
                    names[a.asname or a.name] = f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules \
                        else node.module
    return names


def root_name(node):
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


def import_time_mutations(path, modules):
    """Module-level statements that change what another project module holds: an assignment to
    `mod.x`, `mod.x.y` or `mod.x[k]`, or a mutating call on it (`mod.X.update(...)`)."""
    tree = ast.parse(open(path).read(), path)
    mods = imported_names(tree, modules)
    found = []
    for stmt in module_level(tree):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] \
            if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            for el in (t.elts if isinstance(t, ast.Tuple) else [t]):
                if isinstance(el, (ast.Attribute, ast.Subscript)) and root_name(el) in mods:
                    found.append(f"{os.path.relpath(path, ROOT)}:{stmt.lineno}: {ast.unparse(el)} = ...")
        for node in ast.walk(stmt) if not isinstance(stmt, (ast.If, ast.For, ast.While, ast.With, ast.Try)) else []:
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS \
                    and root_name(node.func.value) in mods:
                found.append(f"{os.path.relpath(path, ROOT)}:{stmt.lineno}: {ast.unparse(node)[:80]}")
    return found


def unused_imports(path, modules):
    """Project modules a file imports and never names again: imported only for what importing does."""
    tree = ast.parse(open(path).read(), path)
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    return [f"{os.path.relpath(path, ROOT)}: {local} ({mod})" for local, mod in imported_names(tree, modules).items()
            if local not in used]


def test_no_module_changes_another_when_imported_and_no_import_is_for_its_side_effects(tmp_path):
    modules = project_modules()
    files = list(modules.values()) + [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests"))
                                      if f.endswith(".py")]
    mutations = [m for f in modules.values() for m in import_time_mutations(f, modules)]
    assert not mutations, "modules that change another module when imported:\n  " + "\n  ".join(mutations)
    unused = [u for f in files for u in unused_imports(f, modules)]
    assert not unused, "imports whose module is never used (a side effect is all they bring):\n  " + "\n  ".join(unused)
    # the checks see what they should: the old baselines.py, in miniature
    (tmp_path / "a.py").write_text("X = {}\n")
    (tmp_path / "b.py").write_text("import a\nimport c\na.X.update(y=1)\na.Y = 2\n\ndef f():\n    a.Z = 3\n")
    (tmp_path / "c.py").write_text("")
    small = project_modules(str(tmp_path))
    assert [m.split(": ", 1)[1] for m in import_time_mutations(str(tmp_path / "b.py"), small)] == \
        ["a.X.update(y=1)", "a.Y = ..."]
    assert [u.split(": ", 1)[1] for u in unused_imports(str(tmp_path / "b.py"), small)] == ["c (c)"]


def test_train_and_eval_are_siblings():
    """train.py and eval.py both stand on checkpoint.py (the run folder) and neither imports the
    other; eval.py plays rows and never needs the method's loss (gopo.py)."""
    graph = import_graph()
    assert "eval" not in graph["train"] and "train" not in graph["eval"]
    assert "gopo" not in graph["eval"]

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

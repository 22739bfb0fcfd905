"""How tangled lsa's intervention code is: the numbers issue 13 ("One intervention engine") asks to bring down.

Static counts over ``lsa/**/*.py`` (read with ``ast``, nothing imported), printed as tables:

1) private imports: names with a leading underscore that one lsa module takes from another,
   as ``from lsa.x import _y`` (at any depth, also inside functions) or as an attribute
   ``x._y`` where ``x`` is bound to an lsa module by an import;
2) hook registrations: calls of ``register_forward_hook``, ``register_forward_pre_hook``,
   ``register_full_backward_hook``, ``register_full_backward_pre_hook``, ``register_backward_hook``
   or a tensor's ``register_hook``, per module;
3) remote branch points: ``if`` / ``elif`` / ``while`` tests, conditional expressions, comprehension
   filters and ``assert`` tests that read an attribute named ``remote`` (``model.remote``,
   ``self.remote``) or ``getattr(..., "remote", ...)``; beside them, the tests that name ``remote``
   in any form (also a ``remote`` argument or ``kwargs["remote"]``) and every read of the attribute;
4) line counts per module;
5) the largest functions (``end_lineno - lineno + 1``, decorators excluded, nested functions
   counted inside their parent and also on their own), with their parameter counts (every
   parameter, ``self`` and ``*args`` included);
6) import cycles between lsa modules, counting imports inside functions (an edge ``a -> b`` for
   every ``import`` / ``from ... import`` in ``a`` that names module ``b`` or a name of it; an
   import of a package above ``a`` itself, which Python has loaded before ``a``, is no edge);
7) names one lsa module imports from another outside that module's exports: its ``__all__``, or,
   where it has none, its names without a leading underscore (``from lsa.x import y`` at any depth,
   or an attribute ``x.y`` where ``x`` is bound to an lsa module; submodules are always exported).

With ``--steering`` (the default; ``--static-only`` skips it) it also measures, on the zoo's
``toy-bilingual`` model, what issue 13 calls the remote steering bug: with neuron steering
active, the largest difference between ``remote=False`` and ``remote="local"`` in end logits
(IOI English prompts) and in head patching (normalised effects), and how far each steered
result lies from the unsteered one. Cost: static part < 1 s; the steering part ~10-30 s on one thread.

    python scripts/engine_stats.py [--static-only] [--top 10] [--check]

``--check`` prints sections 5-7 alone and exits non-zero where a function has more than :data:`MAX_LINES` lines or :data:`MAX_PARAMS` parameters, or where any cycle or
import from outside the exports is found (``tests/test_layout.py`` runs it).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lsa"
HOOK_CALLS = (
    "register_forward_hook",
    "register_forward_pre_hook",
    "register_full_backward_hook",
    "register_full_backward_pre_hook",
    "register_backward_hook",
    "register_hook",
)


def modules() -> dict[str, ast.Module]:
    """``{dotted module name: parsed tree}`` for every file of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")[: -node.level]
    return ".".join([*base, node.module] if node.module else base)


def private_imports(trees: dict[str, ast.Module]) -> list[tuple[str, str, str, int]]:
    """``(importer, source module, private name, line)`` for each private name one lsa module takes from another."""
    found = []
    for name, tree in trees.items():
        aliases: dict[str, str] = {}  # local name -> lsa module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(name, node)
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    if source.split(".")[0] == "lsa" and full in trees:  # from lsa import patching
                        aliases[alias.asname or alias.name] = full
                    elif source.split(".")[0] == "lsa" and alias.name.startswith("_") and source != name:
                        found.append((name, source, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "lsa" and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and aliases[node.value.id] != name
            ):
                found.append((name, aliases[node.value.id], node.attr, node.lineno))
    return sorted(found)


def hook_sites(trees: dict[str, ast.Module]) -> list[tuple[str, str, int]]:
    """``(module, hook method, line)`` of every hook registration call."""
    found = []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in HOOK_CALLS:
                found.append((name, node.func.attr, node.lineno))
    return sorted(found)


def _reads_remote(node: ast.AST) -> bool:
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == "remote" and isinstance(sub.ctx, ast.Load):
            return True
        if (
            isinstance(sub, ast.Call)
            and isinstance(sub.func, ast.Name)
            and sub.func.id == "getattr"
            and len(sub.args) >= 2
            and isinstance(sub.args[1], ast.Constant)
            and sub.args[1].value == "remote"
        ):
            return True
    return False


def _mentions_remote(node: ast.AST) -> bool:
    """Whether an expression names ``remote`` at all: an attribute, a variable, a ``["remote"]`` key or a string."""
    for sub in ast.walk(node):
        if isinstance(sub, ast.Attribute) and sub.attr == "remote":
            return True
        if isinstance(sub, ast.Name) and sub.id == "remote":
            return True
        if isinstance(sub, ast.Constant) and sub.value == "remote":
            return True
    return False


def remote_branches(trees: dict[str, ast.Module]) -> tuple[Counter, Counter, Counter, list[tuple[str, int]]]:
    """Per module: branch points on ``.remote``, branch points naming ``remote`` in any form, all reads of ``.remote``.

    Plus the lines of the first kind.
    """
    branches, broad, reads, where = Counter(), Counter(), Counter(), []
    for name, tree in trees.items():
        for node in ast.walk(tree):
            tests = []
            if isinstance(node, (ast.If, ast.While, ast.IfExp, ast.Assert)):
                tests = [node.test]
            elif isinstance(node, ast.comprehension):
                tests = list(node.ifs)
            for test in tests:
                if _reads_remote(test):
                    branches[name] += 1
                    where.append((name, test.lineno))
                if _mentions_remote(test):
                    broad[name] += 1
            if isinstance(node, ast.Attribute) and node.attr == "remote" and isinstance(node.ctx, ast.Load):
                reads[name] += 1
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and node.args[1].value == "remote"
            ):
                reads[name] += 1
    return branches, broad, reads, sorted(where)


def functions(trees: dict[str, ast.Module]) -> list[tuple[int, int, str]]:
    """``(lines, parameters, module:qualified name)`` of every function and method, largest first."""
    out = []

    def visit(name, node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                a = child.args
                params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
                out.append((child.end_lineno - child.lineno + 1, params, f"{name}:{qual}"))
                visit(name, child, f"{qual}.")
            elif isinstance(child, ast.ClassDef):
                visit(name, child, f"{prefix}{child.name}.")
            else:
                visit(name, child, prefix)

    for name, tree in trees.items():
        visit(name, tree, "")
    return sorted(out, key=lambda x: (-x[0], x[2]))


def _is_package(name: str, trees: dict[str, ast.Module]) -> bool:
    return any(other.startswith(name + ".") for other in trees)


def import_edges(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """``{module: the lsa modules it imports}`` (section 6 of the module docstring), imports inside functions included."""
    edges: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        own = name if _is_package(name, trees) else name.rpartition(".")[0]
        above = {".".join(own.split(".")[:i]) for i in range(1, len(own.split(".")) + 1)}  # loaded before `name`
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(name, node)
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in trees else source for a in node.names]
            for target in targets:
                parts = target.split(".")
                for i in range(1, len(parts) + 1):  # the module and the packages Python loads on the way
                    module = ".".join(parts[:i])
                    if module in trees and module not in above and module != name:
                        edges[name].add(module)
    return edges


def import_cycles(trees: dict[str, ast.Module]) -> list[list[str]]:
    """Groups of lsa modules that import one another (strongly connected components of :func:`import_edges`)."""
    edges, index, low, stack, on, found = import_edges(trees), {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def exports(tree: ast.Module) -> set[str] | None:
    """A module's ``__all__`` (a literal list or tuple), or ``None`` where it has none."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {elt.value for elt in node.value.elts}
    return None


def _module_of(node: ast.AST, aliases: dict[str, str], trees) -> str | None:
    """The lsa module an expression names (``engine``, ``engine.plan``), through the names imports bound."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _module_of(node.value, aliases, trees)
        return f"{base}.{node.attr}" if base and f"{base}.{node.attr}" in trees else None
    return None


def _own_nodes(scope: ast.AST):
    """The nodes of a scope (module, function, class), nested functions and classes given but not entered."""
    todo = list(ast.iter_child_nodes(scope))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def unexported_imports(trees: dict[str, ast.Module]) -> list[tuple[str, str, str, int]]:
    """``(importer, source module, name, line)`` for each name taken from another lsa module outside its exports.

    Scope by scope: an attribute ``x.y`` counts where ``x`` is bound to an lsa module by an import in that
    scope or an enclosing one, and not rebound to something else in that scope.
    """
    declared = {name: exports(tree) for name, tree in trees.items()}

    def exported(source: str, attr: str) -> bool:
        if f"{source}.{attr}" in trees:
            return True
        names = declared[source]
        return attr in names if names is not None else not attr.startswith("_")

    found = []

    def scan(name: str, scope: ast.AST, outer: dict[str, str]) -> None:
        aliases, imported, stored = dict(outer), set(), set()
        nodes = list(_own_nodes(scope))
        for node in nodes:
            if isinstance(node, ast.ImportFrom):
                source = _resolve(name, node)
                for alias in node.names:
                    local = alias.asname or alias.name
                    if f"{source}.{alias.name}" in trees:
                        aliases[local] = f"{source}.{alias.name}"
                        imported.add(local)
                    elif source in trees and source != name and not exported(source, alias.name):
                        found.append((name, source, alias.name, node.lineno))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in trees:
                        local = alias.asname or alias.name.split(".")[0]
                        aliases[local] = alias.name if alias.asname else alias.name.split(".")[0]
                        imported.add(local)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                stored.add(node.id)
        for rebound in stored - imported:
            aliases.pop(rebound, None)
        for node in nodes:
            if isinstance(node, ast.Attribute) and not node.attr.startswith("__"):
                source = _module_of(node.value, aliases, trees)
                if source and source != name and not exported(source, node.attr):
                    found.append((name, source, node.attr, node.lineno))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                scan(name, node, aliases)

    for name, tree in trees.items():
        scan(name, tree, {})
    return sorted(set(found))


def line_counts() -> dict[str, int]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[str(path.relative_to(ROOT))] = len(path.read_text(encoding="utf-8").splitlines())
    return out


def static_report(top: int) -> None:
    trees = modules()
    print("# lsa engine statistics\n")

    imports = private_imports(trees)
    pairs = sorted({(imp, src, nm) for imp, src, nm, _ in imports})
    print(f"## 1. private names imported across lsa modules: {len(pairs)} (importer, source, name) pairs")
    by_importer = Counter(imp for imp, _, _ in pairs)
    for importer, count in sorted(by_importer.items()):
        names = ", ".join(f"{src.split('.')[-1]}.{nm}" for imp, src, nm in pairs if imp == importer)
        print(f"  {importer:<24} {count:>3}  {names}")
    print(f"  sources: {', '.join(f'{s} {c}' for s, c in sorted(Counter(src for _, src, _ in pairs).items()))}")

    hooks = hook_sites(trees)
    print(f"\n## 2. hook-registration call sites: {len(hooks)} in {len({m for m, _, _ in hooks})} modules")
    for module, count in sorted(Counter(m for m, _, _ in hooks).items()):
        kinds = Counter(k for m, k, _ in hooks if m == module)
        lines = ", ".join(str(line) for m, _, line in hooks if m == module)
        print(f"  {module:<24} {count:>3}  {dict(kinds)}  lines {lines}")

    branches, broad, reads, where = remote_branches(trees)
    print(
        f"\n## 3. remote branch points (tests reading .remote): {sum(branches.values())} in {len(branches)} modules;"
        f" tests naming remote in any form (also a `remote` argument, kwargs['remote']): {sum(broad.values())} in"
        f" {len(broad)} modules; reads of .remote: {sum(reads.values())} in {len(reads)} modules"
    )
    print(f"  {'module':<24} {'branches':>8} {'any form':>8} {'reads':>6}  branch lines")
    for module in sorted(set(branches) | set(broad) | set(reads)):
        lines = ", ".join(str(line) for m, line in where if m == module)
        print(f"  {module:<24} {branches[module]:>8} {broad[module]:>8} {reads[module]:>6}  {lines}")

    counts = line_counts()
    print(f"\n## 4. line counts: {sum(counts.values())} lines in {len(counts)} files")
    for path, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])):
        print(f"  {path:<28} {n:>5}")

    layout_report(trees, top)


MAX_LINES, MAX_PARAMS = 80, 12  # a function longer or wider is two functions or an object (STYLE.md)


def layout_report(trees: dict[str, ast.Module], top: int) -> int:
    """Sections 5-7; returns how many findings break the limits (``--check``)."""
    funcs = functions(trees)
    print(f"\n## 5. the {top} longest functions (lines, parameters):")
    for lines, params, name in funcs[:top]:
        print(f"  {lines:>4} {params:>3}  {name}")
    over = [(lines, params, name) for lines, params, name in funcs if lines > MAX_LINES or params > MAX_PARAMS]
    print(f"  over {MAX_LINES} lines or {MAX_PARAMS} parameters: {len(over)}")
    for lines, params, name in over:
        print(f"    {lines:>4} {params:>3}  {name}")

    cycles = import_cycles(trees)
    print(f"\n## 6. import cycles (imports inside functions counted): {len(cycles)}")
    for group in cycles:
        print(f"  {' <-> '.join(group)}")

    unexported = unexported_imports(trees)
    print(f"\n## 7. names imported from outside a module's exports: {len(unexported)}")
    for importer, source, attr, line in unexported:
        print(f"  {importer}:{line}  {source}.{attr}")
    return len(over) + len(cycles) + len(unexported)


def steering_report() -> None:
    """The remote steering gap on toy-bilingual (see the module docstring)."""
    import torch

    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    torch.set_num_threads(1)
    from parity.cases import zoo_steering

    from lsa import behaviour, neurons, steering
    from lsa.patching import activation_patching

    local, remote, prompts, edits = zoo_steering()
    sizes = [neurons.neuron_count(e.neurons) for e in edits]

    def run(model, fn):
        with steering.steer(model, *edits):
            return fn(model)

    logits = lambda m: behaviour.end_logits(m, prompts)
    heads = lambda m: activation_patching(m, prompts, "head", progress=False).normalized
    print(
        "\n## 6. steering on toy-bilingual (LAPE on the shipped en and zh corpora: en neurons set to 0, "
        f"zh neurons set to 4 x their zh mean; {sizes[0]} + {sizes[1]} neurons; IOI en, {len(prompts)} prompts)"
    )
    print(f"  {'quantity':<16} {'|remote - local| steered':>26} {'|steered - unsteered| local':>29}")
    for label, fn in (("end logits", logits), ("head patching", heads)):
        plain = fn(local)
        steered_local, steered_remote = run(local, fn), run(remote, fn)
        gap = float((steered_remote - steered_local).abs().max())
        moved = float((steered_local - plain).abs().max())
        print(f"  {label:<16} {gap:>26.4g} {moved:>29.4g}")
    print("  (target after issue 13: remote - local <= 1e-4, steered - unsteered clearly > 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static-only", action="store_true", help="skip the toy-bilingual steering measurement")
    parser.add_argument("--top", type=int, default=10, help="how many of the largest functions to list")
    parser.add_argument("--check", action="store_true", help="sections 5-7 alone; exit 1 on any finding")
    args = parser.parse_args()
    if args.check:
        sys.exit(1 if layout_report(modules(), args.top) else 0)
    static_report(args.top)
    if not args.static_only:
        steering_report()


if __name__ == "__main__":
    main()

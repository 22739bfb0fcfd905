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
   counted inside their parent and also on their own).

With ``--steering`` (the default; ``--static-only`` skips it) it also measures, on the zoo's
``toy-bilingual`` model, what issue 13 calls the remote steering bug: with neuron steering
active, the largest difference between ``remote=False`` and ``remote="local"`` in end logits
(IOI English prompts) and in head patching (normalised effects), and how far each steered
result lies from the unsteered one. Cost: static part < 1 s; the steering part ~10-30 s on one thread.

    python scripts/engine_stats.py [--static-only] [--top 5]
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


def functions(trees: dict[str, ast.Module]) -> list[tuple[int, str]]:
    """``(lines, module:qualified name)`` of every function and method, largest first."""
    out = []

    def visit(name, node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qual = f"{prefix}{child.name}"
                out.append((child.end_lineno - child.lineno + 1, f"{name}:{qual}"))
                visit(name, child, f"{qual}.")
            elif isinstance(child, ast.ClassDef):
                visit(name, child, f"{prefix}{child.name}.")
            else:
                visit(name, child, prefix)

    for name, tree in trees.items():
        visit(name, tree, "")
    return sorted(out, key=lambda x: (-x[0], x[1]))


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

    funcs = functions(trees)
    lines, name = funcs[0]
    print(f"\n## 5. largest function: {name} ({lines} lines); top {top}:")
    for lines, name in funcs[:top]:
        print(f"  {lines:>4}  {name}")


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
    parser.add_argument("--top", type=int, default=5, help="how many of the largest functions to list")
    args = parser.parse_args()
    static_report(args.top)
    if not args.static_only:
        steering_report()


if __name__ == "__main__":
    main()

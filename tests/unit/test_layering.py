"""gigatron.core never imports gigatron.training (checked on the source, by AST)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CORE = os.path.join(ROOT, "gigatron", "core")


def _imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                package = os.path.relpath(os.path.dirname(path), ROOT).split(os.sep)
                base = package[: len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:
                yield node.lineno, f"{module}.{alias.name}"


def test_core_never_imports_training():
    offenders = []
    for directory, _, files in os.walk(CORE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                for lineno, module in _imports(path):
                    if module == "gigatron.training" or module.startswith("gigatron.training."):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{lineno} imports {module}")
    assert offenders == [], "gigatron.core must not import gigatron.training:\n" + "\n".join(offenders)


def test_scan_sees_core_files():
    count = sum(name.endswith(".py") for _, _, files in os.walk(CORE) for name in files)
    assert count > 5


def _module_name(path):
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _core_import_graph():
    """{module: modules of gigatron.core it imports}. `from package import submodule` is an edge to
    the submodule alone (the package is already initialising), as Python resolves it."""
    paths = {}
    for directory, _, files in os.walk(CORE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                paths[_module_name(path)] = path
    graph = {}
    for module, path in paths.items():
        tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
        package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                submodules = {f"{base}.{alias.name}" for alias in node.names} & paths.keys()
                edges.update(submodules if len(submodules) == len(node.names) else submodules | {base})
        graph[module] = {m for m in edges if m in paths and m != module}
    return graph


def _cycles(graph):
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_core_import_graph_has_no_cycle():
    cycles = _cycles(_core_import_graph())
    assert cycles == [], "import cycles inside gigatron.core (a factory or shared table belongs in a " \
        "module above what it uses):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []

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

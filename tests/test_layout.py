"""The size limits of the source layout (issue 14): no module in src/qtune over 400 lines, no function over 60.

A function's length counts its lines from ``def`` to its last line, without its docstring (docstrings carry the
shapes, units and errors the guide asks for, and are not logic)."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "qtune"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def function_lengths(path: Path) -> list[tuple[str, int]]:
    """(qualified name, lines without docstring) of every function and method in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = child.decorator_list[0].lineno if child.decorator_list else child.lineno
                length = child.end_lineno - start + 1  # type: ignore[operator]
                doc = ast.get_docstring(child, clean=False)
                if doc is not None:
                    first = child.body[0]
                    length -= first.end_lineno - first.lineno + 1  # type: ignore[operator]
                out.append((f"{prefix}{child.name}", length))
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")

    visit(tree, "")
    return out


def test_the_limits_are_measured_on_real_code():
    sizes = dict(function_lengths(SRC / "jsonio.py"))
    assert sizes and all(n > 0 for n in sizes.values())
    assert len(list(SRC.rglob("*.py"))) > 20


def test_no_module_is_over_400_lines():
    long = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert long == {}


def test_no_function_is_over_60_lines():
    long = {
        f"{p.relative_to(SRC)}:{name}": n
        for p in sorted(SRC.rglob("*.py"))
        for name, n in function_lengths(p)
        if n > MAX_FUNCTION_LINES
    }
    assert long == {}

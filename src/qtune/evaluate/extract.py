"""Code extraction: the completion to score, taken from a model's free-form answer to a HumanEval problem
(:func:`extract_code`), re-indented by its structure to the problem's prompt."""

from __future__ import annotations

import ast
import functools
import re
import tokenize
import warnings

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.S)
_TAB = 4
"""Columns a tab stands for in an answer's indentation (read this way also where tabs and spaces are mixed)."""


def extract_code(answer: str, problem: dict) -> str:
    """The completion to append to the problem's prompt, taken from a model's free-form answer.

    - A fenced block (```python ... ```, also an unclosed one): the first that defines the entry point, else
      the first Python (or untagged) block; the fence and the prose around it are dropped.
    - An answer that re-states the function (``def entry_point(``): the code from the first line of imports
      before it on, appended after the prompt as a new definition that replaces the prompt's stub, at the
      indentation of the prompt's ``def``. Top-level lines after it that are neither definitions, imports,
      assignments nor comments (prose, example calls such as ``print(f(3))``) end the code.
    - Otherwise raw code: a function body, placed at the indentation of the prompt's body (read from the
      prompt, not assumed). Prose or top-level code after an indented body (a statement starting at column 0;
      comments, continuation lines and lines inside strings do not count) is cut. When the body's first line
      is not indented but later ones are, the first line is read as having lost its indentation if the body
      does not parse otherwise; an unindented body that does not parse is cut before the last column-0
      statement that makes it parse (prose after it).

    Both kinds of code are re-indented by their structure, whatever the answer's indentation (2, 3, 4 or 8
    spaces, tabs, counted as 4 columns, or a mix): each logical line's block depth is kept and written with
    the prompt's indentation unit; continuation lines (inside brackets, after a backslash) move with their
    statement; lines inside multi-line strings are left exactly as they are.
    """
    entry = problem["entry_point"]
    def_indent, body_indent = _prompt_indents(problem["prompt"], entry)
    nested = body_indent.startswith(def_indent) and body_indent != def_indent
    unit = body_indent[len(def_indent) :] if nested else "    "  # the prompt's indentation step
    code = answer
    blocks = _FENCE.findall(answer)
    if blocks:
        python = [body for lang, body in blocks if lang.lower() in ("", "python", "py", "python3")] or [
            b for _, b in blocks
        ]
        code = next((b for b in python if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", b, re.M)), python[0])
    code = code.replace("\r\n", "\n")
    m = re.search(rf"^([ \t]*)def\s+{re.escape(entry)}\s*\(", code, re.M)
    if m:
        lines = code.splitlines()
        start = code[: m.start()].count("\n")
        # keep the imports and helpers written above the function, drop the prose
        above = [line for line in lines[:start] if not line.strip() or _looks_like_code(line)]
        block = _Lines(above + lines[start:])
        top = block.widths[block.code[0]] if block.code else 0
        cut = next(
            (
                i
                for i in block.code
                if block.widths[i] <= top
                and not _looks_like_code(block.lines[i].lstrip())
                and not block.lines[i].lstrip().startswith((")", "]", "}", "if __name__"))
            ),
            len(block.lines),
        )
        return "\n" + block.render(def_indent, unit, cut=cut).strip("\n") + "\n"
    body = _Lines(code.strip("\n").splitlines())
    if not body.code:
        return body_indent + "pass\n"
    first = body.code[0]
    zeros = [i for i in body.code[1:] if body.widths[i] == 0]  # column-0 lines after the first: prose, if indented
    cut = zeros[0] if zeros else len(body.lines)
    candidates = [(body.widths[first], cut if body.widths[first] else len(body.lines))]
    later = [body.widths[i] for i in body.code[1:] if i < cut]
    if later and 0 < min(later) != body.widths[first]:
        candidates.append((min(later), cut))  # the first line lost (or gained) its indentation
    if not body.widths[first]:
        candidates += [(0, z) for z in reversed(zeros)]
    completions = [
        body.render(body_indent, unit, cut=c, first_width=w).strip("\n").rstrip() + "\n" for w, c in candidates
    ]
    return next((c for c in completions if _parses(problem["prompt"] + c)), completions[0])


class _Lines:
    """An answer's code lines with each line's kind and indentation width (columns, tabs as :data:`_TAB`).

    Kinds: ``code`` (starts a logical line), ``comment`` (a comment alone), ``blank``, ``cont`` (continues a
    logical line: inside brackets or after a backslash), ``verbatim`` (begins inside a multi-line string). They
    come from :mod:`tokenize` run on the lines with their indentation removed, so any indentation tokenizes;
    where the tokenizer stops (an unclosed string or bracket), the remaining lines count as code.
    """

    def __init__(self, lines: list[str]):
        self.lines = lines
        self.widths = [len(_lead(line).expandtabs(_TAB)) for line in lines]
        kinds: list[str | None] = [None if line.strip() else "blank" for line in lines]
        feed = iter([line.lstrip(" \t") + "\n" for line in lines])
        at_start = True  # the next token begins a logical line
        try:
            for tok in tokenize.generate_tokens(lambda: next(feed, "")):
                if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
                    at_start = at_start or tok.type == tokenize.NEWLINE
                    continue
                row = tok.start[0] - 1
                if row < len(lines) and kinds[row] is None:
                    kinds[row] = ("comment" if tok.type == tokenize.COMMENT else "code") if at_start else "cont"
                for r in range(tok.start[0], min(tok.end[0], len(lines))):
                    kinds[r] = "verbatim"  # rows after the first of a multi-line string
                at_start = at_start and tok.type == tokenize.COMMENT
        except (tokenize.TokenError, SyntaxError):
            pass
        self.kinds = [k or "code" for k in kinds]
        self.code = [i for i, k in enumerate(self.kinds) if k == "code"]

    def render(self, base: str, unit: str, cut: int | None = None, first_width: int | None = None) -> str:
        """The lines before ``cut``, re-indented: a code line at block depth d starts with ``base + unit * d``.

        Depth follows the widths as Python's tokenizer does: deeper opens a block, shallower closes blocks back to
        the nearest open one at or below it (one between two open widths joins the outer one; one shallower than
        the first line becomes the outermost width); ``first_width`` replaces the first code line's width.
        """
        out: list[str] = []
        stack: list[int] = []  # widths of the open blocks
        shift = 0  # columns the current logical line moved, applied to its continuation lines
        for i, (line, kind, width) in enumerate(zip(self.lines[:cut], self.kinds, self.widths, strict=False)):
            text = line.lstrip(" \t")
            if kind in ("blank", "verbatim"):
                out.append(line if kind == "verbatim" else "")
                continue
            if kind == "cont":
                out.append(" " * max(0, width + shift) + text)
                continue
            if kind == "code":
                if first_width is not None and i == self.code[0]:
                    width = first_width
                if not stack or width > stack[-1]:
                    stack.append(width)
                while len(stack) > 1 and stack[-1] > width:
                    stack.pop()
                stack[-1] = min(stack[-1], width)  # shallower than the first line: the outermost block's width
                depth = len(stack) - 1
            else:  # a comment: the depth of the deepest open block it reaches, opening none
                depth = max(0, sum(1 for w in stack if w <= width) - 1)
            indent = base + unit * depth
            if kind == "code":
                shift = len(indent.expandtabs(_TAB)) - width
            out.append(indent + text)
        return "\n".join(out)


@functools.lru_cache(maxsize=256)
def _prompt_indents(prompt: str, entry: str) -> tuple[str, str]:
    """(indentation of the entry point's ``def`` line, indentation of its body) in the prompt.

    From the syntax tree: the last definition of ``entry`` and its first body line (the docstring). A prompt
    that does not parse (no body yet): the ``def`` line's indentation, and the last non-empty line's when it is
    deeper (else one level of four spaces below the ``def``).
    """
    lines = prompt.splitlines()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tree = ast.parse(prompt)
        defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == entry]
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        defs = []
    if defs:
        d = max(defs, key=lambda n: n.lineno)
        head, first = lines[d.lineno - 1], lines[d.body[0].lineno - 1]
        if d.body[0].lineno > d.lineno:
            return _lead(head), _lead(first)
        return _lead(head), _lead(head) + "    "
    heads = [line for line in lines if re.match(rf"[ \t]*(async\s+)?def\s+{re.escape(entry)}\s*\(", line)]
    head = _lead(heads[-1]) if heads else ""
    last = next((line for line in reversed(lines) if line.strip()), "")
    if not last.rstrip().endswith(":") and len(_lead(last).expandtabs(_TAB)) > len(head.expandtabs(_TAB)):
        return head, _lead(last)
    return head, head + "    "


def _lead(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _parses(source: str) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return True


_CODE_START = re.compile(r"^(import |from \S+ import |def |class |@|#|[A-Za-z_][A-Za-z0-9_]*\s*=|\s)")


def _looks_like_code(line: str) -> bool:
    return bool(_CODE_START.match(line))

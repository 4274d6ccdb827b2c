"""main.py reads top to bottom: no top-level definition uses a name from a later section.

The single-file version of an import rule (STYLE.md, "main.py as a story"): each section
behind a `# ----- name` banner may use what the sections above it define, never what
comes below, annotations included.
"""

import ast
import re
from pathlib import Path

MAIN = Path(__file__).resolve().parent.parent / "main.py"
BANNER = re.compile(r"^# -{20,} (?P<name>[\w ]+)$")


def sections(lines: list[str]) -> list[tuple[int, str]]:
    """(first line number, name) of each banner, in order."""
    return [(i + 1, m["name"]) for i, line in enumerate(lines) if (m := BANNER.match(line))]


def section_at(line: int, banners: list[tuple[int, str]]) -> int:
    return max((i for i, (start, _) in enumerate(banners) if start <= line), default=-1)


def defined_names(tree: ast.Module) -> dict[str, int]:
    """Top-level names and the line that first defines them."""
    names: dict[str, int] = {}
    for node in tree.body:
        targets = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            targets = [node.name]
        elif isinstance(node, ast.Assign):
            targets = [t.id for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            targets = [node.target.id]
        for name in targets:
            names.setdefault(name, node.lineno)
    return names


def annotation_names(node: ast.AST) -> set[str]:
    """Names inside annotations written as strings (forward references such as "Job | None")."""
    notes = []
    for sub in ast.walk(node):
        if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
            notes += [a.annotation for a in sub.args.args + sub.args.kwonlyargs if a.annotation] + [sub.returns]
        elif isinstance(sub, ast.AnnAssign):
            notes.append(sub.annotation)
    strings = [n.value for note in notes if note is not None for n in ast.walk(note)
               if isinstance(n, ast.Constant) and isinstance(n.value, str)]
    return {name for text in strings for name in re.findall(r"[A-Za-z_]\w*", text)}


def local_names(node: ast.AST) -> set[str]:
    """Names bound inside a definition (parameters, assignments): they shadow top-level ones."""
    bound = set()
    for sub in ast.walk(node):
        if isinstance(sub, ast.arg):
            bound.add(sub.arg)
        elif isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Store):
            bound.add(sub.id)
    return bound


def used_names(node: ast.AST) -> set[str]:
    """Every top-level name a definition loads, annotations included."""
    loads = {sub.id for sub in ast.walk(node) if isinstance(sub, ast.Name) and isinstance(sub.ctx, ast.Load)}
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        loads -= local_names(node) - {node.name}
    return loads | annotation_names(node)


def test_main_py_sections_only_use_names_from_sections_above():
    source = MAIN.read_text()
    lines = source.splitlines()
    banners = sections(lines)
    tree = ast.parse(source)
    defined = defined_names(tree)
    later = []
    for node in tree.body:
        mine = section_at(node.lineno, banners)
        for name in used_names(node) & defined.keys():
            theirs = section_at(defined[name], banners)
            if theirs > mine:
                later.append(f"line {node.lineno} ({banners[mine][1]}) uses {name} from {banners[theirs][1]}")
    assert not later, "\n".join(later)


def test_main_py_lists_its_sections_in_order_in_the_docstring():
    lines = MAIN.read_text().splitlines()
    names = [name for _, name in sections(lines)]
    docstring = ast.get_docstring(ast.parse(MAIN.read_text()))
    listed = [line.split()[0] if line.split() else "" for line in docstring.splitlines() if line.startswith("   ")]
    assert [n.split()[0] for n in names] == listed


def test_classes_and_route_handlers_are_top_level_names():
    """No class or route handler hides inside a function (grep and outlines find them all)."""
    tree = ast.parse(MAIN.read_text())
    hidden = [f"{outer.name}.{inner.name}" for outer in tree.body
              if isinstance(outer, (ast.FunctionDef, ast.AsyncFunctionDef))
              for inner in ast.walk(outer)
              if inner is not outer and (isinstance(inner, ast.ClassDef) or (
                  isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)) and inner.decorator_list))]
    assert not hidden, hidden

"""The layering DESIGN.md draws, read from the code's own imports: packages import only
packages below them, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "alacrity"

#: Each package (or top-level module) and its floor; an import must go to a lower floor.
FLOORS = {
    "cli": 8,
    "daemon": 7,  # the composition root: model, gate and admin tree wired together
    "admin": 6,
    "bus": 5,
    "client": 5,
    "vm": 5,
    "devices": 4,
    "switch": 3,
    "vhost_user": 2,
    "virtio": 1,
    "agent": 1,  # the guest agent's protocol and build: the standard library only
    "native_build": 0,
    "errors": 0,
    "ids": 0,
    "alacrity": 0,  # the package's face: its version
}


def modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(name: str, path: Path) -> set[str]:
    """Every alacrity module `name` imports, at any depth of its code (late imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("alacrity")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("alacrity"):
                out.add(target)
                out |= {f"{target}.{a.name}" for a in node.names}
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t in imports(name, path) if t in known and t != name}
            for name, path in known.items()}


def area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "alacrity"


def test_every_package_has_a_floor() -> None:
    areas = {area(m) for m in modules()}
    assert areas <= FLOORS.keys(), f"give these a floor in FLOORS: {areas - FLOORS.keys()}"


def test_imports_point_down() -> None:
    upward = [
        f"{src} -> {dst}"
        for src, targets in graph().items()
        for dst in targets
        if area(src) != area(dst) and FLOORS[area(dst)] >= FLOORS[area(src)]
    ]
    assert not upward, "imports that do not point down:\n" + "\n".join(sorted(upward))


def test_no_module_imports_itself_in_a_circle() -> None:
    g = graph()
    # A package's __init__ re-exporting its own modules is not a circle of its own making.
    edges = {m: {t for t in ts if not (m.startswith(t + ".") and t in g)} for m, ts in g.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "circles:\n" + "\n".join(" -> ".join(c) for c in cycles)

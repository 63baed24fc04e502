"""The direction of dependencies (ARCHITECTURE.md), checked on every module's imports (read with ``ast``, not run).

    model core  <-  perception / policy cores  <-  sim, training  <-  CLI
                          ^
                     ROS adapters (nodes, message conversion, node plumbing)

* a library module (everything but the ROS adapters and the CLI) imports neither ``rclpy`` nor message packages;
* nothing but the CLI imports ``omnistream_cli``;
* a module never imports a layer above its own; the ROS adapters import the cores, never sim, training or the CLI.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
from conftest import REPO

ROOTS = {
    "omnistream_perception": REPO / "ros2_ws/src/omnistream_perception/omnistream_perception",
    "omnistream_vla": REPO / "ros2_ws/src/omnistream_vla/omnistream_vla",
    "omnistream_sim": REPO / "sim/omnistream_sim",
    "omnistream_train": REPO / "training/omnistream_train",
    "omnistream_cli": REPO / "cli/omnistream_cli",
}
# The ROS adapters: the only modules of the two ROS packages that may talk to ROS.
ROS_PREFIXES = (
    "omnistream_perception.ros.",
    "omnistream_vla.ros.",
)
ROS_IMPORTS = ("rclpy", "rosidl", "builtin_interfaces", "lifecycle_msgs")
LAYERS = {"model": 0, "core": 1, "ros": 2, "sim_training": 2, "cli": 3}


def _modules() -> dict[str, Path]:
    found = {}
    for package, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> str:
    if module.startswith("omnistream_cli"):
        return "cli"
    if module.startswith(("omnistream_sim", "omnistream_train")):
        return "sim_training"
    if (module + ".").startswith(ROS_PREFIXES):
        return "ros"
    if module.startswith("omnistream_perception.model"):
        return "model"
    return "core"


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def _is_ros(name: str) -> bool:
    top = name.split(".")[0]
    return top.startswith(ROS_IMPORTS) or top.endswith("_msgs") or top.endswith("_srvs")


def _violations() -> list[str]:
    out = {}  # one line per (module, what it reaches), however many names it imports from there
    for module, path in MODULES.items():
        mine = layer_of(module)
        for name in sorted(_imports(path, module)):
            if _is_ros(name) and mine not in ("ros", "cli"):
                top = name.split(".")[0]
                out[(module, top)] = f"{module} ({mine}) imports {top}: ROS belongs in the adapters"
                continue
            if not name.startswith("omnistream_") or name.startswith("omnistream_msgs"):
                continue
            target = next((m for m in (name, name.rpartition(".")[0]) if m in MODULES), None)
            if target is None:
                continue
            theirs = layer_of(target)
            if theirs == "cli" and mine != "cli":
                out[(module, target)] = f"{module} ({mine}) imports the CLI ({target})"
            elif theirs == "ros" and mine not in ("ros", "cli"):
                out[(module, target)] = f"{module} ({mine}) imports the ROS adapter {target}"
            elif LAYERS[theirs] > LAYERS[mine] or (mine == "ros" and theirs == "sim_training"):
                out[(module, target)] = f"{module} ({mine}) imports {target} ({theirs}), a layer above it"
    return sorted(out.values())


def test_every_package_is_found_in_a_folder_named_as_it_is_imported():
    assert {m.split(".")[0] for m in MODULES} == set(ROOTS)
    assert all(root.name == package for package, root in ROOTS.items())
    assert "omnistream_perception.model.modeling_omnistream" in MODULES


def test_dependencies_run_one_way():
    violations = _violations()
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    ("module", "imports", "expected"),
    [
        ("omnistream_perception.perception", {"rclpy"}, "ROS belongs in the adapters"),
        ("omnistream_sim.rollout", {"omnistream_cli.errors"}, "imports the CLI"),
        ("omnistream_perception.model.rope", {"omnistream_perception.perception"}, "a layer above it"),
    ],
)
def test_the_checker_catches_each_kind_of_violation(module, imports, expected, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "_imports", lambda path, mod: imports if mod == module else set())
    assert any(expected in v for v in _violations())


# The tests mirror the layout: library tests run without ROS, node tests live apart.
TESTS = REPO / "tests"
LIBRARY_TEST_FOLDERS = ("perception", "vla", "training", "sim")
REPO_WIDE_TESTS = {"test_layering.py", "test_readme_snippets.py"}


def _talks_to_ros(name: str) -> bool:
    """An adapter module that needs ROS to be imported (the parameter tables beside the nodes are plain Python;
    their declaration helpers import rclpy only when a node calls them)."""
    target = next((m for m in (name, name.rpartition(".")[0]) if m in MODULES), None)
    if target is None or not (target + ".").startswith(ROS_PREFIXES):
        return False
    tree = ast.parse(MODULES[target].read_text())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top_level if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in top_level if isinstance(n, ast.ImportFrom)}
    return any(_is_ros(n) for n in names)


def _test_violations() -> list[str]:
    out = []
    for folder in LIBRARY_TEST_FOLDERS:
        for path in sorted((TESTS / folder).glob("*.py")):
            for name in sorted(_imports(path, path.stem)):
                top = name.split(".")[0]
                if _is_ros(name) or top == "ros_helpers" or _talks_to_ros(name):
                    out.append(f"tests/{folder}/{path.name} imports {name}: a ROS test belongs in tests/ros/")
    strays = [p.name for p in TESTS.glob("test_*.py") if p.name not in REPO_WIDE_TESTS]
    out += [f"tests/{name} is not in the folder of what it tests" for name in strays]
    return out


def test_library_tests_run_without_ros_and_every_test_has_its_folder():
    assert all((TESTS / folder).is_dir() for folder in (*LIBRARY_TEST_FOLDERS, "ros", "cli"))
    violations = _test_violations()
    assert not violations, "\n".join(violations)

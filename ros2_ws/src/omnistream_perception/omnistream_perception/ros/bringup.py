"""Run the nodes a launch file declares in one process (MultiThreadedExecutor), without ``ros2 launch``.

``launch`` / ``launch_ros`` are not on PyPI (see ``../shared/specs/ros2-from-pypi.md``), so machines with
pip-only ROS cannot run launch files. Our launch files stay thin (node declarations, launch arguments, a
params YAML, lifecycle transitions); this module executes ``generate_launch_description()`` with small recording
stand-ins for the few launch classes they use (``launch_stand_ins``: launch arguments, ``OpaqueFunction``,
``SetEnvironmentVariable``, ``EmitEvent``, ``RegisterEventHandler``; ``launch_ros`` ``Node``, ``LifecycleNode``,
the ``ChangeState`` event and the ``OnStateTransition`` handler), then constructs the declared
nodes in this process with the same parameters files and remappings, passed as ROS arguments exactly as
``ros2 launch`` would, after applying the environment the launch file sets. The lifecycle transitions the launch
file emits (and those its handlers emit on a node's transition events) go through the nodes' real lifecycle
services (``launch_lifecycle``) before ``create_nodes`` returns.

Node classes are found from the console-script entry point of ``package``/``executable`` (the one rclpy
``Node`` subclass defined in that module). They must accept ``node_name=...`` and rclpy ``Node`` keyword
arguments (``context``, ``cli_args``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import inspect
import runpy
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .launch_stand_ins import (
    LaunchContext,
    LaunchRecorderStandIn,
    LifecycleRequest,
    TransitionHandler,
    resolve_substitutions,
)

_SRC = Path(__file__).resolve().parents[3]  # ros2_ws/src in a checkout
REPO_ROOT = _SRC.parents[1]


@dataclass
class NodeDeclaration:
    package: str
    executable: str
    name: str
    namespace: str = ""
    parameters: list[Any] = field(default_factory=list)  # YAML file paths or {name: value} dicts
    remappings: list[tuple[str, str]] = field(default_factory=list)
    lifecycle: bool = False  # a launch_ros LifecycleNode

    def ros_arguments(self, extra_params_files: list[str] = (), overrides: dict[str, Any] | None = None) -> list[str]:
        """The ``--ros-args`` that ``ros2 launch`` would pass (later files and ``-p`` win)."""
        args = ["--ros-args"]
        for source, target in self.remappings:
            args += ["-r", f"{source}:={target}"]
        for params in self.parameters:
            if isinstance(params, dict):
                args += [a for k, v in params.items() for a in ("-p", f"{k}:={_yaml_value(v)}")]
            else:
                args += ["--params-file", str(params)]
        for path in extra_params_files:
            args += ["--params-file", str(path)]
        for key, value in (overrides or {}).items():
            args += ["-p", f"{key}:={_yaml_value(value)}"]
        return args


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_yaml_value(v) for v in value) + "]"
    return str(value)


def package_share_directory(package: str) -> str:
    """The package's source folder in a checkout (where config/ lives), else the installed share directory."""
    source = _SRC / package
    if (source / "package.xml").is_file():
        return str(source)
    import ament_index_python.packages as ament_packages

    # While launch files run, the module attribute is this function (see _launch_stand_ins): use the real one.
    lookup = getattr(package_share_directory, "ament_lookup", None) or ament_packages.get_package_share_directory
    return lookup(package)


@contextlib.contextmanager
def _launch_stand_ins(recorder: LaunchRecorderStandIn):
    import ament_index_python.packages as ament_packages

    saved = {name: sys.modules.get(name) for name in recorder.modules()}
    sys.modules.update(recorder.modules())
    real_lookup = ament_packages.get_package_share_directory
    package_share_directory.ament_lookup = real_lookup
    ament_packages.get_package_share_directory = package_share_directory
    try:
        yield
    finally:
        ament_packages.get_package_share_directory = real_lookup
        package_share_directory.ament_lookup = None
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class LaunchDeclarations(list):
    """The nodes a launch file declares (a list of ``NodeDeclaration``), the environment it sets and the lifecycle
    transitions it asks for (``lifecycle_requests`` at launch, ``transition_handlers`` on transition events)."""

    def __init__(self, nodes=(), environment: dict[str, str] | None = None, arguments: dict[str, str] | None = None,
                 lifecycle_requests=(), transition_handlers=()):  # fmt: skip
        super().__init__(nodes)
        self.environment = dict(environment or {})
        self.arguments = dict(arguments or {})  # every launch argument's value (given or default)
        self.lifecycle_requests: list[LifecycleRequest] = list(lifecycle_requests)
        self.transition_handlers: list[TransitionHandler] = list(transition_handlers)


def load_launch_file(path: str | Path, arguments: dict[str, str] | None = None) -> LaunchDeclarations:
    """The nodes ``path`` declares, with launch arguments resolved (``arguments`` override the defaults)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"launch file not found: {path}")
    recorder = LaunchRecorderStandIn()
    with _launch_stand_ins(recorder):
        namespace = runpy.run_path(str(path))
        if "generate_launch_description" not in namespace:
            raise ValueError(f"{path} has no generate_launch_description()")
        description = namespace["generate_launch_description"]()
        unknown = set(arguments or {}) - set(recorder.arguments)
        if unknown:
            raise ValueError(
                f"{path.name} has no launch argument(s) {sorted(unknown)}; it has {sorted(recorder.arguments)}"
            )
        values = {k: str(resolve_substitutions(v, {})) for k, v in recorder.arguments.items() if v is not None}
        values.update(arguments or {})
        missing = sorted(set(recorder.arguments) - set(values))
        if missing:
            raise ValueError(f"{path.name} needs launch argument(s) {missing}: pass NAME:=VALUE")
        recorder.visit(description, LaunchContext(dict(values)))
    declarations = LaunchDeclarations(
        environment={
            str(resolve_substitutions(k, values)): str(resolve_substitutions(v, values))
            for k, v in recorder.environment
        },
        arguments=values,
    )
    names = {}
    for spec in recorder.nodes:
        declarations.append(
            NodeDeclaration(
                package=spec["package"],
                executable=spec["executable"],
                name=str(resolve_substitutions(spec["name"], values)),
                namespace=str(resolve_substitutions(spec["namespace"], values)),
                parameters=[resolve_substitutions(p, values) for p in spec["parameters"]],
                remappings=[
                    (str(resolve_substitutions(a, values)), str(resolve_substitutions(b, values)))
                    for a, b in spec["remappings"]
                ],
                lifecycle=spec["lifecycle"],
            )
        )
        names[id(spec)] = declarations[-1].name
    declarations.lifecycle_requests, declarations.transition_handlers = recorder.lifecycle_plan(names, values)
    return declarations


def node_class(package: str, executable: str) -> type:
    """The rclpy ``Node`` subclass behind ``ros2 run package executable``."""
    from rclpy.node import Node

    points = list(importlib.metadata.entry_points(group="console_scripts", name=executable))
    module_name = points[0].value.split(":")[0] if points else f"{package}.{executable}"
    if not module_name.startswith(package + "."):
        raise ValueError(f"console script {executable!r} belongs to {module_name}, not package {package!r}")
    module = importlib.import_module(module_name)
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, Node) and c.__module__ == module.__name__
    ]
    wanted = executable.replace("_", "").lower()
    for cls in classes:
        if cls.__name__.lower() == wanted:
            return cls
    if len(classes) == 1:
        return classes[0]
    raise ValueError(f"cannot tell which Node class {module_name} runs ({[c.__name__ for c in classes]})")


def create_nodes(
    declarations: list[NodeDeclaration],
    context=None,
    extra_params_files: list[str] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> list:
    """Construct the declared nodes in this process and make the lifecycle transitions the launch file asks for
    (a failed configure raises what made it fail). ``overrides`` maps node name -> {parameter: value}."""
    nodes = []
    try:
        for decl in declarations:
            cls = node_class(decl.package, decl.executable)
            args = decl.ros_arguments(extra_params_files, (overrides or {}).get(decl.name))
            nodes.append(cls(node_name=decl.name, namespace=decl.namespace or None, context=context, cli_args=args))
        requests = getattr(declarations, "lifecycle_requests", [])
        if requests:
            from .launch_lifecycle import drive_transitions

            handlers = getattr(declarations, "transition_handlers", [])
            drive_transitions(dict(zip([d.name for d in declarations], nodes)), requests, handlers, context)
    except BaseException:
        for node in nodes:
            node.destroy_node()
        raise
    return nodes


def spin_nodes(nodes: list, context=None, duration: float | None = None, stop: threading.Event | None = None) -> None:
    """Spin ``nodes`` on a MultiThreadedExecutor until ``duration`` seconds pass, ``stop`` is set or the context is
    shut down (rclpy's SIGINT/SIGTERM handlers do that); callbacks in flight finish before it returns."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from .node_main import CALLBACK_DRAIN_S

    context = context if context is not None else rclpy.get_default_context()
    executor = MultiThreadedExecutor(context=context)
    for node in nodes:
        executor.add_node(node)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while context.ok() and not (stop is not None and stop.is_set()):
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                executor.spin_once(timeout_sec=0.1)
            except ExternalShutdownException:
                break
            except Exception:
                # A signal can shut the context down between the ok() check and the wait's timer creation.
                if context.ok():
                    raise
                break
    finally:
        executor.shutdown(timeout_sec=CALLBACK_DRAIN_S)


def default_launch_file(with_vla: bool) -> Path:
    """The launch file that ``ros2 launch`` would run: perception only, or perception + VLA (omnistream_vla)."""
    if with_vla:
        return Path(package_share_directory("omnistream_vla")) / "launch" / "omnistream.launch.py"
    return Path(package_share_directory("omnistream_perception")) / "launch" / "perception.launch.py"

"""Recording stand-ins for the few ``launch`` / ``launch_ros`` classes our launch files use (neither is on PyPI),
for ``bringup``: executing ``generate_launch_description()`` with them records the launch arguments, the nodes, the
environment and the lifecycle events instead of starting processes.

The stand-ins take the real classes' keyword names: ``DeclareLaunchArgument``, ``OpaqueFunction``,
``SetEnvironmentVariable``, ``EmitEvent``, ``RegisterEventHandler``, ``launch.events.matches_action``,
``LaunchConfiguration``; ``launch_ros`` ``Node``, ``LifecycleNode``, ``events.lifecycle.ChangeState`` and
``event_handlers.OnStateTransition``. Entities run in the order ``ros2 launch`` visits them (an
``OpaqueFunction``'s returned entities where it stands); other events or handlers are refused with a clear error.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LifecycleRequest:
    """A ChangeState event for one declared node (by its declaration's name)."""

    node: str
    transition_id: int  # lifecycle_msgs/Transition


@dataclass
class TransitionHandler:
    """An OnStateTransition handler: when ``node`` (None: any) makes a transition matching every given label, the
    ``requests`` follow."""

    node: str | None
    requests: list[LifecycleRequest]
    transition: str | None = None
    start_state: str | None = None
    goal_state: str | None = None
    handle_once: bool = False

    def matches(self, node: str, transition: str, start_state: str, goal_state: str) -> bool:
        seen = dict(transition=transition, start_state=start_state, goal_state=goal_state)
        wanted = dict(transition=self.transition, start_state=self.start_state, goal_state=self.goal_state)
        return self.node in (None, node) and all(v is None or v == seen[k] for k, v in wanted.items())


class _LaunchConfiguration:
    def __init__(self, name: str, default: Any = None):
        self.name, self.default = name, default

    def perform(self, context: LaunchContext) -> str:
        return str(resolve_substitutions(self, context.launch_configurations))


@dataclass
class LaunchContext:
    launch_configurations: dict[str, str]


def resolve_substitutions(value: Any, arguments: dict[str, str]) -> Any:
    if isinstance(value, _LaunchConfiguration):
        if value.name in arguments:
            return arguments[value.name]
        if value.default is not None:
            return resolve_substitutions(value.default, arguments)
        raise ValueError(f"launch argument {value.name!r} has no value: pass {value.name}:=VALUE")
    if isinstance(value, list):  # a list of substitutions concatenates
        return "".join(str(resolve_substitutions(v, arguments)) for v in value)
    if isinstance(value, dict):  # a node's parameter dict
        return {k: resolve_substitutions(v, arguments) for k, v in value.items()}
    return value


class LaunchRecorderStandIn:
    """Stand-in modules ``launch`` (``.actions``, ``.substitutions``, ``.events``) and ``launch_ros`` (``.actions``,
    ``.event_handlers``, ``.events.lifecycle``) that record what a launch file declares instead of starting
    processes."""

    def __init__(self) -> None:
        self.arguments: dict[str, Any] = {}
        self.nodes: list[dict[str, Any]] = []
        self.node_actions: list[Any] = []  # the Node / LifecycleNode stand-ins, for event matchers
        self.environment: list[tuple[Any, Any]] = []
        self.requests: list[Any] = []  # ChangeState events emitted at launch, in order
        self.handlers: list[Any] = []  # OnStateTransition handlers registered at launch

    def visit(self, entities, context: LaunchContext) -> None:
        """Executes the entities of a launch description in order, as ``ros2 launch`` visits them."""
        for entity in entities or ():
            visit = getattr(entity, "visit", None)
            if visit is not None:
                visit(context)

    def modules(self) -> dict[str, types.ModuleType]:
        recorder = self

        class LaunchDescription(list):
            def add_action(self, action) -> None:
                self.append(action)

            def visit(self, context) -> None:
                recorder.visit(self, context)

        class DeclareLaunchArgument:
            def __init__(self, name, default_value=None, description="", **_):
                self.name, self.default_value, self.description = name, default_value, description
                recorder.arguments[name] = default_value

        class Node:
            lifecycle = False

            def __init__(self, *, executable, package=None, name=None, namespace="", parameters=(), remappings=(),
                         **_):  # fmt: skip
                self.spec = dict(
                    package=package,
                    executable=executable,
                    name=name or executable,
                    namespace=namespace or "",
                    parameters=list(parameters or ()),
                    remappings=list(remappings or ()),
                    lifecycle=self.lifecycle,
                )
                recorder.nodes.append(self.spec)
                recorder.node_actions.append(self)

        class LifecycleNode(Node):
            lifecycle = True

        class OpaqueFunction:
            def __init__(self, function, args=None, kwargs=None, **_):
                self.function, self.args, self.kwargs = function, args or (), kwargs or {}

            def visit(self, context) -> None:
                recorder.visit(self.function(context, *self.args, **self.kwargs), context)

        class SetEnvironmentVariable:
            def __init__(self, name, value, **_):
                recorder.environment.append((name, value))

        class EmitEvent:
            def __init__(self, *, event, **_):
                if not isinstance(event, ChangeState):
                    raise ValueError(f"omnistream bringup runs only ChangeState events, not {type(event).__name__}")
                self.event = event

            def visit(self, context) -> None:
                recorder.requests.append(self.event)

        class RegisterEventHandler:
            def __init__(self, event_handler, **_):
                if not isinstance(event_handler, OnStateTransition):
                    raise ValueError(
                        f"omnistream bringup runs only OnStateTransition handlers, not {type(event_handler).__name__}"
                    )
                self.event_handler = event_handler

            def visit(self, context) -> None:
                recorder.handlers.append(self.event_handler)

        class ChangeState:
            def __init__(self, *, lifecycle_node_matcher, transition_id):
                self.lifecycle_node_matcher, self.transition_id = lifecycle_node_matcher, transition_id

        class OnStateTransition:
            def __init__(self, *, entities, target_lifecycle_node=None, transition=None, start_state=None,
                         goal_state=None, matcher=None, handle_once=False, **_):  # fmt: skip
                if matcher is not None:
                    raise ValueError("omnistream bringup cannot run an OnStateTransition with a custom matcher")
                self.entities = entities if isinstance(entities, list | tuple) else [entities]
                self.target, self.handle_once = target_lifecycle_node, handle_once
                self.states = dict(transition=transition, start_state=start_state, goal_state=goal_state)

        def matches_action(target_action):
            return lambda action: action is target_action

        launch = types.ModuleType("launch")
        launch.LaunchDescription = LaunchDescription
        actions = types.ModuleType("launch.actions")
        for cls in (DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable, EmitEvent, RegisterEventHandler):
            setattr(actions, cls.__name__, cls)
        substitutions = types.ModuleType("launch.substitutions")
        substitutions.LaunchConfiguration = _LaunchConfiguration
        events = types.ModuleType("launch.events")
        events.matches_action = matches_action
        launch.actions, launch.substitutions, launch.events = actions, substitutions, events
        launch_ros = types.ModuleType("launch_ros")
        ros_actions = types.ModuleType("launch_ros.actions")
        ros_actions.Node, ros_actions.LifecycleNode = Node, LifecycleNode
        ros_handlers = types.ModuleType("launch_ros.event_handlers")
        ros_handlers.OnStateTransition = OnStateTransition
        ros_events = types.ModuleType("launch_ros.events")
        ros_lifecycle = types.ModuleType("launch_ros.events.lifecycle")
        ros_lifecycle.ChangeState = ChangeState
        ros_events.lifecycle = ros_lifecycle
        launch_ros.actions, launch_ros.event_handlers, launch_ros.events = ros_actions, ros_handlers, ros_events
        return {
            "launch": launch,
            "launch.actions": actions,
            "launch.substitutions": substitutions,
            "launch.events": events,
            "launch_ros": launch_ros,
            "launch_ros.actions": ros_actions,
            "launch_ros.event_handlers": ros_handlers,
            "launch_ros.events": ros_events,
            "launch_ros.events.lifecycle": ros_lifecycle,
        }

    def lifecycle_plan(self, names: dict[int, str], arguments: dict[str, str]):
        """The recorded ChangeState events and OnStateTransition handlers, with node actions as declaration names
        (``names``: id of a node's spec -> its declaration's name)."""
        lifecycle = [(action, names[id(action.spec)]) for action in self.node_actions if action.lifecycle]

        def requests(event) -> list[LifecycleRequest]:
            targets = [name for action, name in lifecycle if event.lifecycle_node_matcher(action)]
            return [LifecycleRequest(name, int(event.transition_id)) for name in targets]

        handlers = []
        for handler in self.handlers:
            emitted = [r for entity in handler.entities for r in requests(getattr(entity, "event", entity))]
            target = None if handler.target is None else names[id(handler.target.spec)]
            states = {
                k: None if v is None else str(resolve_substitutions(v, arguments)) for k, v in handler.states.items()
            }
            handlers.append(TransitionHandler(target, requests=emitted, handle_once=handler.handle_once, **states))
        return [r for event in self.requests for r in requests(event)], handlers

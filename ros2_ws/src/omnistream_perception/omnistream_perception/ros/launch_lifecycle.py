"""The lifecycle transitions of a launch file, made in-process through the nodes' real lifecycle services.

What launch_ros does under ``ros2 launch``, for ``omnistream bringup``: each ``ChangeState`` request calls the
node's ``~/change_state`` service; the node's ``~/transition_event`` messages are matched against the
``OnStateTransition`` handlers, whose requests follow in turn (configure, then activate once the node is
inactive). Unlike ``ros2 launch``, which logs a failed transition and carries on, the bring-up stops: a failed
configure raises what made it fail (a missing checkpoint, a bad parameter), so ``omnistream bringup`` ends with
one error line and exit 2, as a node started with ``autostart`` does.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence

# Discovery of a node's transition_event publisher and service by the bring-up's own node (same process).
DISCOVERY_TIMEOUT_S = 30.0


class TransitionFailed(ValueError):
    """A lifecycle transition the launch file asked for did not succeed (a ValueError: a start-up error)."""


def transition_label(transition_id: int) -> str:
    from lifecycle_msgs.msg import Transition

    for name in dir(Transition):
        if name.startswith("TRANSITION_") and getattr(Transition, name) == transition_id:
            return name.removeprefix("TRANSITION_").lower()
    return str(transition_id)


def drive_transitions(nodes: dict, requests: Sequence, handlers: Sequence, context=None) -> list[tuple[str, ...]]:
    """Makes the ``requests`` (``LifecycleRequest``) and those the ``handlers`` (``TransitionHandler``) add, on
    ``nodes`` (declaration name -> node, spun here meanwhile); returns the transitions seen as
    (node, transition, start state, goal state) labels."""
    import rclpy
    from lifecycle_msgs.msg import State, Transition, TransitionEvent
    from lifecycle_msgs.srv import ChangeState, GetState
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    from .managed_node import ManagedNode

    context = context if context is not None else rclpy.get_default_context()
    driver = rclpy.create_node("omnistream_bringup_lifecycle", context=context, start_parameter_services=False)
    executor = MultiThreadedExecutor(context=context)
    for node in (*nodes.values(), driver):
        executor.add_node(node)
    seen: list[tuple[str, ...]] = []
    finished: Counter[str] = Counter()  # transitions that reached a primary state, per node
    lock = threading.Lock()

    def on_event(name: str, msg: TransitionEvent) -> None:
        with lock:
            seen.append((name, msg.transition.label, msg.start_state.label, msg.goal_state.label))
            if msg.goal_state.id < State.TRANSITION_STATE_CONFIGURING:
                finished[name] += 1

    def spin_until(done: Callable[[], bool], what: str, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not done():
            if not context.ok():
                raise ExternalShutdownException()
            if deadline is not None and time.monotonic() > deadline:
                raise TransitionFailed(f"no {what} within {timeout_s:g} s")
            executor.spin_once(timeout_sec=0.05)

    def call(client, request, what: str):
        spin_until(client.service_is_ready, what, DISCOVERY_TIMEOUT_S)
        future = client.call_async(request)
        spin_until(future.done, f"answer of {what}")  # no limit: configure may load a model for minutes
        return future.result()

    peers = {}
    for name, node in nodes.items():
        full = node.get_fully_qualified_name()
        events = f"{full}/transition_event"
        sub = driver.create_subscription(TransitionEvent, events, lambda m, n=name: on_event(n, m), 10)
        peers[name] = (sub, driver.create_client(ChangeState, f"{full}/change_state"),
                       driver.create_client(GetState, f"{full}/get_state"))  # fmt: skip
    with contextlib.ExitStack() as quiet:
        for node in nodes.values():
            if isinstance(node, ManagedNode):
                quiet.enter_context(node.caller_reports_failures())
        try:
            for name in {r.node for r in requests}:
                spin_until(lambda s=peers[name][0]: s.get_publisher_count() > 0,
                           f"{name}/transition_event publisher", DISCOVERY_TIMEOUT_S)  # fmt: skip
            queue, calls, handled, handlers = deque(requests), Counter(), 0, list(handlers)
            while queue:
                request = queue.popleft()
                name, label = request.node, transition_label(request.transition_id)
                node, (_, change, get) = nodes[name], peers[name]
                response = call(
                    change, ChangeState.Request(transition=Transition(id=request.transition_id)), f"{name} {label}"
                )
                if not response.success:
                    failure = node.failure if isinstance(node, ManagedNode) else None
                    if failure is not None:
                        raise failure
                    state = call(get, GetState.Request(), f"{name} get_state").current_state.label
                    raise TransitionFailed(f"{name}: lifecycle transition {label!r} failed (the node is {state})")
                calls[name] += 1
                spin_until(lambda n=name: finished[n] >= calls[n], f"transition event of {name} {label}", 10.0)
                with lock:
                    new, handled = seen[handled:], len(seen)
                for event in new:
                    for handler in list(handlers):
                        if handler.matches(*event):
                            queue.extend(handler.requests)
                            if handler.handle_once:
                                handlers.remove(handler)
        finally:
            for node in nodes.values():
                executor.remove_node(node)
            executor.shutdown()
            driver.destroy_node()
    return seen

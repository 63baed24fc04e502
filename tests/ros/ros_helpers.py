"""Helpers the live-ROS tests share: spin nodes in a thread, wait for a condition, call a Trigger service."""

from __future__ import annotations

import threading
import time


def wait_for(predicate, timeout: float = 10.0, what: str = "a condition") -> None:
    """Polls ``predicate`` until it is true; fails the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def spin_in_thread(nodes, context=None, num_threads: int | None = 4):
    """A MultiThreadedExecutor spinning ``nodes`` in a daemon thread; returns (executor, thread)."""
    from rclpy.executors import MultiThreadedExecutor

    executor = MultiThreadedExecutor(num_threads=num_threads, context=context)
    for node in nodes:
        executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    return executor, thread


def stop_spinning(executor, thread, nodes=()) -> None:
    """Ends what ``spin_in_thread`` started (the executor, then its thread) and destroys ``nodes``."""
    executor.shutdown()
    thread.join(timeout=5)
    for node in nodes:
        node.destroy_node()


def call_trigger(client, timeout: float = 10.0):
    """Calls a std_srvs/Trigger service (spun elsewhere) and returns its response."""
    from std_srvs.srv import Trigger

    assert client.wait_for_service(timeout_sec=timeout), f"service {client.srv_name} not available"
    future = client.call_async(Trigger.Request())
    wait_for(future.done, timeout, f"{client.srv_name} to answer")
    return future.result()

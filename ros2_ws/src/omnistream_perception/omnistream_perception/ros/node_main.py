"""The one ``main()`` every OmniStream node runs: init, spin on a multi-threaded executor, exit cleanly.

SIGINT and SIGTERM (Ctrl-C, ``docker stop``, systemd, a script's ``kill``) end the process with 0: rclpy's own
signal handlers (installed by ``rclpy.init``) shut the context down, which wakes the executor; the callbacks in
flight finish, ``on_exit`` runs (the recorder writes its buffer) and the node is destroyed, in that order. A
signal that arrives while the node is still being built (a model loading) ends the start-up the same way. A
configuration error raised while the node is built (bad parameter, missing checkpoint, policy or params file) is
logged as one FATAL line and ends it with 2, so a launch file or a shell script sees the failure instead of a
traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node

# Longest wait for callbacks in flight (one policy step, one recorder write) once a stop is requested; a
# perception frame in flight is waited for by the node's own destroy_node().
CALLBACK_DRAIN_S = 2.0


def run_node(
    make_node: Callable[[], Node],
    logger_name: str,
    args: list[str] | None = None,
    num_threads: int | None = None,
    on_exit: Callable[[Node], None] | None = None,
) -> int:
    """Builds the node with ``make_node()`` and spins it until shutdown; ``on_exit(node)`` runs before it is
    destroyed (e.g. the recorder writes its buffer)."""
    logger = rclpy.logging.get_logger(logger_name)
    problem = ros_args_problem(sys.argv if args is None else args)
    if problem is not None:  # rcl would log its own ERROR line before ours: say it once, plainly
        logger.fatal(problem)
        return 2
    try:
        rclpy.init(args=args)
    except Exception as exc:  # a missing --params-file or malformed --ros-args is rejected by rcl here
        logger.fatal(_one_line(exc))
        return 2
    context = rclpy.get_default_context()
    node = None
    executor = None
    try:
        node = make_node()
        executor = MultiThreadedExecutor(num_threads=num_threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, OSError) as exc:
        if context.ok():
            logger.fatal(_one_line(exc))
            return 2
    except Exception:
        # A signal during start-up shuts the context down under the constructor, which then fails creating its
        # next publisher or timer: that is a requested stop, not an error.
        if context.ok():
            raise
    finally:
        if executor is not None:
            executor.shutdown(timeout_sec=CALLBACK_DRAIN_S)
        if node is not None:
            if on_exit is not None:
                on_exit(node)
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def exit_process(code: int) -> None:
    """Ends a node's process with ``code`` once ``run_node`` has returned: ROS is shut down and the node has
    closed what it wrote by then, while the interpreter's own teardown of torch and transformers takes seconds
    (a stopped vla_node took 3-4 s to exit, of which 12 ms were the node's). Console scripts only, never in-process."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def ros_args_problem(argv: list[str]) -> str | None:
    """Why the ROS arguments of ``argv`` would be rejected by rcl (a ``--params-file`` that cannot be read, a
    ``-p NAME:=`` without a value), or None. rcl rejects them too, but with a multi-line ERROR before ours."""
    in_ros_args = False
    for i, token in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if token == "--ros-args":
            in_ros_args = True
        elif token == "--":
            in_ros_args = False
        elif not in_ros_args or following is None:
            continue
        elif token == "--params-file" and not Path(following).is_file():
            return f"params file not found: {following} (--params-file)"
        elif token in ("-p", "--param"):
            name, sep, value = following.partition(":=")
            if not sep or not name:
                return f"malformed parameter override {following!r}: write -p NAME:=VALUE"
            if not value.strip():
                return (
                    f"parameter {name!r} has no value ({token} {following}): give one, or leave it out for the default"
                )
    return None

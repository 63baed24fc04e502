"""The one ``main()`` every OmniStream node runs: init, spin on a multi-threaded executor, exit cleanly.

Ctrl-C and an external shutdown end the process with 0; a configuration error raised while the node is built
(bad parameter, missing checkpoint or policy) is logged as one FATAL line and ends it with 2, so a launch file
or a shell script sees the failure instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import rclpy
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node


def run_node(
    make_node: Callable[[], Node],
    logger_name: str,
    args: list[str] | None = None,
    num_threads: int | None = None,
    on_exit: Callable[[Node], None] | None = None,
) -> int:
    """Builds the node with ``make_node()`` and spins it until shutdown; ``on_exit(node)`` runs before it is
    destroyed (e.g. the recorder writes its buffer)."""
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        executor = MultiThreadedExecutor(num_threads=num_threads)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (ValueError, OSError) as exc:
        rclpy.logging.get_logger(logger_name).fatal(str(exc))
        return 2
    finally:
        if node is not None:
            if on_exit is not None:
                on_exit(node)
            node.destroy_node()
        rclpy.try_shutdown()
    return 0

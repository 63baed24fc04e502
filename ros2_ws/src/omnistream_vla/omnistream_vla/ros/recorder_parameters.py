"""recorder_node's parameters: names, defaults, checks (rclpy-free; ``recorder_node`` declares them).

Every one is checked at start (a bad one is a start-up error: one FATAL line) and on every change (refused with
the reason); ``bag_name`` and ``queue_depth`` cannot change once the node runs. Topic names are checked by the
node itself, which resolves them in its namespace (``RecorderController.resolve_topics``).
"""

from __future__ import annotations

import math
from typing import Any

from omnistream_perception.ros.node_params import ParamSpec, integer_in, number_in


def _topic_names(value: Any) -> str | None:
    if isinstance(value, str):  # `topics: /camera/image_raw` in a params file: one topic
        return None
    if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
        return f"must be a list of topic names, got {value!r}"
    return None


def _text(value: Any) -> str | None:
    return None if isinstance(value, str) else f"must be a string, got {value!r}"


def _directory(value: Any) -> str | None:
    return _text(value) or (None if value.strip() else "must not be empty")


def _boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


_POSITIVE = number_in(0, math.inf, low_open=True)

PARAMETERS: dict[str, ParamSpec] = {
    "topics": ParamSpec([""], "topics to record, any type (relative names use the node's namespace)",
                        check=_topic_names),
    "instruction_topic": ParamSpec("/instruction", "std_msgs/String instruction (recorded too); '' = none",
                                   check=_text),
    "output_dir": ParamSpec("bags", "directory the bags are created in (a change starts a new bag)",
                            check=_directory),
    "bag_name": ParamSpec("", "bag directory name ('' = rosbag2_<date>-<time>)", True, _text),
    "record_always": ParamSpec(False, "record between episodes too", check=_boolean),
    "chunk_duration_s": ParamSpec(5.0, "close a chunk file at least this often, seconds (> 0)", check=_POSITIVE),
    "chunk_max_mb": ParamSpec(256.0, "close a chunk once this much is buffered, MB (> 0)", check=_POSITIVE),
    "min_free_mb": ParamSpec(64.0, "refuse to write with less free disk space, MB (>= 0)",
                             check=number_in(0, math.inf)),
    "queue_depth": ParamSpec(1000, "subscription queue depth, 1..1000000 (rides out stalls)", True,
                             integer_in(1, 1_000_000)),
    "retry_period_s": ParamSpec(2.0, "after a write error, retry this often, seconds (> 0)", check=_POSITIVE),
}  # fmt: skip

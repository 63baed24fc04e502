"""OmniStream perception: the streaming backbone, geometry heads and the ROS 2 perception node."""

from .cpu_threads import apply_environment_defaults as _apply_cpu_policy

_apply_cpu_policy()  # before torch loads anywhere in this process (see cpu_threads)

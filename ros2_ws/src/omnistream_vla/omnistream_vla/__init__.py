"""OmniStream VLA: the policy (rclpy-free), the VLA node and the finetuning-data recorder."""

import omnistream_perception  # noqa: F401  (applies the stack's CPU threading policy before torch loads)

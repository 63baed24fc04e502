"""OmniStream VLA: the policy (rclpy-free), the VLA node and the finetuning-data recorder."""

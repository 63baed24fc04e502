"""The VLA package's ROS 2 adapters: the VLA node (a lifecycle node over ``VLAController``) and the recorder
node, their parameters and messages. Everything here may import rclpy; nothing outside `ros/` (and the CLI)
imports from here."""

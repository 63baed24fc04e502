"""The perception package's ROS 2 adapters: the node, message conversion, /diagnostics, parameters, node
plumbing shared with the VLA package, in-process bring-up. Everything here may import rclpy; nothing outside
`ros/` (and the CLI) imports from here."""

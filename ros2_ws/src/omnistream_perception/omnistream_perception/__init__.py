"""OmniStream perception: the streaming backbone, geometry heads and the ROS 2 perception node."""

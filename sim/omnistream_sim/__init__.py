"""Simulation: the built-in pybullet tabletop, CALVIN and SimplerEnv harnesses, one rollout loop."""

"""The built-in pybullet tabletop: a Franka Panda, a table, three coloured blocks and language tasks.

Small stable API (see the module docstrings for conventions and array formats):

* :class:`TabletopEnv`, :class:`TabletopConfig` (``TabletopConfig.debug()`` for tests) — ``env.py``
* :data:`TASKS`, :data:`TASK_SETS`, :class:`Task` — ``tasks.py``
* :class:`ScriptedExpert` — ``expert.py``
* :func:`generate_demonstrations`, :func:`load_demonstrations`, :class:`Episode`,
  :func:`generate_geometry_sequences`, :class:`GeometrySequence` — ``data.py``
* :func:`backproject` and the camera conventions — ``cameras.py``
"""

from .cameras import CameraFrame, CameraSpec, backproject
from .data import (
    Episode,
    GeometrySequence,
    generate_demonstrations,
    generate_geometry_sequences,
    load_demonstrations,
)
from .env import TabletopConfig, TabletopEnv
from .expert import ScriptedExpert
from .tasks import TASK_SETS, TASKS, Task, resolve_tasks, task_from_instruction

__all__ = [
    "TASKS",
    "TASK_SETS",
    "CameraFrame",
    "CameraSpec",
    "Episode",
    "GeometrySequence",
    "ScriptedExpert",
    "TabletopConfig",
    "TabletopEnv",
    "Task",
    "backproject",
    "generate_demonstrations",
    "generate_geometry_sequences",
    "load_demonstrations",
    "resolve_tasks",
    "task_from_instruction",
]

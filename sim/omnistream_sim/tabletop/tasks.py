"""The tabletop's tasks: one scene layout, the language instruction picks the block and the verb.

Every task is ``<kind>_<colour>``; kinds:

* ``lift``: grasp the named block and raise it; success when its centre is at least ``LIFT_HEIGHT`` above its
  resting height.
* ``push_left``: push the named block towards the left of the static camera's image (world -y); success when it
  moved at least ``PUSH_DISTANCE`` in -y and still rests on the table (not lifted).

Success is a function of the block positions at the start of the episode and now (like CALVIN's task oracle),
so it can be checked from logged states as well as live.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.1, 0.1, 1.0),
    "green": (0.1, 0.7, 0.15, 1.0),
    "blue": (0.1, 0.2, 0.85, 1.0),
}
LIFT_HEIGHT = 0.06  # metres above the resting height
PUSH_DISTANCE = 0.08  # metres towards -y
ON_TABLE_TOLERANCE = 0.02  # a pushed block may not be raised more than this

TEMPLATES: dict[str, tuple[str, ...]] = {
    "lift": ("lift the {colour} block", "pick up the {colour} block", "raise the {colour} block"),
    "push_left": (
        "push the {colour} block to the left",
        "slide the {colour} block left",
        "move the {colour} block left",
    ),
}


@dataclass(frozen=True)
class Task:
    kind: str
    colour: str

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.colour}"

    def instruction(self, template: int = 0) -> str:
        templates = TEMPLATES[self.kind]
        return templates[template % len(templates)].format(colour=self.colour)

    def success(self, start: dict[str, np.ndarray], now: dict[str, np.ndarray]) -> bool:
        """``start``/``now``: colour -> block centre (x, y, z) in metres, at the episode's start and now."""
        p0, p1 = np.asarray(start[self.colour]), np.asarray(now[self.colour])
        if self.kind == "lift":
            return bool(p1[2] - p0[2] >= LIFT_HEIGHT)
        if self.kind == "push_left":
            return bool(p0[1] - p1[1] >= PUSH_DISTANCE and p1[2] - p0[2] <= ON_TABLE_TOLERANCE)
        raise ValueError(f"unknown task kind {self.kind!r}")


TASKS: dict[str, Task] = {t.name: t for t in (Task(k, c) for k in TEMPLATES for c in COLOURS)}
# Named sets for data generation and evaluation; "lift" is the minimal set of three tasks that differ only in the
# block the instruction names.
TASK_SETS: dict[str, tuple[str, ...]] = {
    "lift": tuple(f"lift_{c}" for c in COLOURS),
    "push": tuple(f"push_left_{c}" for c in COLOURS),
    "all": tuple(TASKS),
}


def resolve_tasks(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Task names from a set name ("lift", "all"), a comma list ("lift_red,push_left_blue") or a sequence."""
    names: list[str] = []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item in TASK_SETS:
            names.extend(TASK_SETS[item])
        elif item in TASKS:
            names.append(item)
        else:
            raise ValueError(
                f"unknown tabletop task {item!r}; choose from sets {sorted(TASK_SETS)} or tasks {sorted(TASKS)}"
            )
    if not names:
        raise ValueError("no tabletop tasks selected")
    return tuple(dict.fromkeys(names))


def task_from_instruction(instruction: str) -> Task | None:
    """The task whose templates produce ``instruction`` (used when instructions are swapped in evaluation)."""
    text = instruction.strip().lower()
    for task in TASKS.values():
        if any(text == t.format(colour=task.colour) for t in TEMPLATES[task.kind]):
            return task
    return None

"""SimplerEnv's four WidowX (Bridge) tasks and their protocol constants (``../shared/specs/simulators.md``)."""

from __future__ import annotations

from dataclasses import dataclass

EPISODES_PER_TASK = 24  # episode_id 0..23: the fixed object layouts of the visual-matching setup


@dataclass(frozen=True)
class BridgeTask:
    name: str  # the simpler_env.make name
    short: str  # the column name papers use
    max_steps: int  # steps per episode; success is read at the last one
    instruction: str  # what the env says (the stand-in uses it; the real env reports its own)


BRIDGE_TASKS: dict[str, BridgeTask] = {
    t.name: t
    for t in (
        BridgeTask("widowx_carrot_on_plate", "carrot", 60, "put carrot on plate"),
        BridgeTask("widowx_put_eggplant_in_basket", "eggplant", 120, "put eggplant into yellow basket"),
        BridgeTask("widowx_spoon_on_towel", "spoon", 60, "put the spoon on the towel"),
        BridgeTask("widowx_stack_cube", "cube", 60, "stack the green block on the yellow block"),
    )
}
TASK_ALIASES = {t.short: t.name for t in BRIDGE_TASKS.values()}


def resolve_tasks(spec: str | None) -> list[BridgeTask]:
    """``all`` (or None) or a comma list of task names / short names -> tasks in the standard order."""
    if spec in (None, "", "all"):
        return list(BRIDGE_TASKS.values())
    tasks = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        name = TASK_ALIASES.get(part, part)
        if name not in BRIDGE_TASKS:
            choices = ", ".join(list(TASK_ALIASES) + list(BRIDGE_TASKS))
            raise ValueError(f"unknown SimplerEnv-Bridge task {part!r}; choose all or from: {choices}")
        tasks.append(BRIDGE_TASKS[name])
    return tasks

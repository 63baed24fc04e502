#!/usr/bin/env python3
"""vla_node's action execution compared on the tabletop: queue vs ACT temporal ensembling, same episodes.

Trains a small policy (60 scripted lift demonstrations, the ``demo`` VLA preset at 64 px with robot state and the
auxiliary target head, 800 steps: about 2 minutes on 2 CPU cores), then evaluates it closed loop through the real
``perception_node`` + ``vla_node`` (``omnistream_sim.policies.RosPolicy``, lock-step on simulated time) once per
execution setting, on the same held-out episode seeds. Per setting: success rate and the mean action jerk (norm of
the third difference of the executed arm actions, in the tabletop's [-1, 1] units, averaged over episodes).

    .venv/bin/python scripts/compare_action_execution.py --out outputs/action_execution
    .venv/bin/python scripts/compare_action_execution.py --episodes 90 --settings queue,ensemble:0.01,ensemble:1

Prints a table and writes ``results.json`` in ``--out``. A setting is ``queue`` or ``ensemble:M`` (``ensemble_m``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ENV = dict(layout="slots", image_size=64, render_wrist=False, start_noise=(0.05, 0.15, 0.04))
ARCH = {"image_size": 64, "pool": 1, "visual_positions": True, "instruction_first": True, "target_loss_weight": 3.0}


def train(out: Path, seed: int) -> Path:
    import torch

    from omnistream_sim.tabletop.data import generate_demonstrations
    from omnistream_sim.tabletop.env import TabletopConfig
    from omnistream_train.vla import VLATrainConfig, run_vla_training

    policy = out / "vla" / "policy"
    if (policy / "config.json").is_file():
        return policy
    torch.set_num_threads(1)
    demos = out / "demos"
    if not (demos / "index.json").is_file():
        generate_demonstrations(60, seed=1000 * seed, out_dir=demos, tasks="lift", progress=False,
                                config=TabletopConfig(**ENV), action_noise=0.3)  # fmt: skip
    cfg = VLATrainConfig.from_preset("demo", policy_overrides=ARCH, max_steps=800, target=True, seed=seed,
                                     save_every=0, warmup_steps=30)  # fmt: skip
    run_vla_training(cfg, demos, out / "vla", progress=False)
    return policy


def evaluate(policy_dir: Path, setting: str, episodes: int, seed: int) -> dict:
    from omnistream_cli.policies import make_policy
    from omnistream_sim.rollout import evaluate_tabletop, relative_action
    from omnistream_sim.tabletop.env import TabletopConfig
    from omnistream_vla.action_execution import action_jerk

    if setting == "queue":
        params = {"action_execution": "queue"}
    else:
        params = {"action_execution": "ensemble", "ensemble_m": float(setting.partition(":")[2] or 0.01)}
    policy = make_policy(f"ros:{policy_dir}", seed=seed, env_name="tabletop", vla_params=params)
    executed: list[np.ndarray] = []

    def convert(action):
        a = relative_action(action)
        executed.append(a[:6].copy())
        return a

    successes, jerks, start = [], [], time.perf_counter()
    try:
        for i in range(episodes):
            executed.clear()
            r = evaluate_tabletop(policy, episodes=1, episode_offset=i, out_dir=None, seed=seed, tasks="lift",
                                  config=TabletopConfig(**ENV, max_steps=50), videos=0, progress=False,
                                  convert=convert)  # fmt: skip
            successes.append(bool(r["records"][0]["success"]))
            jerks.append(action_jerk(np.array(executed)))
    finally:
        policy.close()
    return {"setting": setting, "episodes": episodes, "success_rate": float(np.mean(successes)),
            "mean_jerk": float(np.mean(jerks)), "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/action_execution", help="demonstrations, policy, results.json")
    parser.add_argument("--episodes", type=int, default=30, help="held-out episodes per setting (lift, 3 colours)")
    parser.add_argument("--settings", default="queue,ensemble:0.01", help="comma list: queue | ensemble:M")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--eval-seed", type=int, default=100_000, help="seed of the first evaluation episode")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    policy = train(out, args.seed)
    rows = [evaluate(policy, s, args.episodes, args.eval_seed) for s in args.settings.split(",")]
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(f"{'setting':<16} {'success':>8} {'jerk':>8} {'seconds':>8}")
    for row in rows:
        print(f"{row['setting']:<16} {row['success_rate']:>8.3f} {row['mean_jerk']:>8.4f} {row['seconds']:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The real CALVIN simulator, built from calvin_env's own hydra configs without the dataset.

calvin_env (mees/calvin_env) is not on PyPI and nothing of it is part of this repository: users point
``--calvin-env-root`` or ``$CALVIN_ENV_ROOT`` at a git checkout (its scene assets and configs are resolved
from that root; its extra dependencies: hydra-core, hydra-colorlog, gym, numpy-quaternion, opencv, gitpython,
scipy). We compose ``conf/config_data_collection.yaml`` with the evaluation's choices (scene D, the robot with
longer fingers, the static and gripper cameras, no VR), instantiate ``cfg.env`` with ``show_gui=False`` and
``use_scene_info=True`` (the task oracle reads the scene info), and load the oracle from
``conf/tasks/new_playtable_tasks.yaml``. The checkout's git commit goes into every result: later commits of
calvin_env changed the button/LED reset, so numbers are comparable only at the same commit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_VAR = "CALVIN_ENV_ROOT"
RENDERERS = ("egl", "tiny")
CONFIG_NAME = "config_data_collection"
OVERRIDES = ("cameras=static_and_gripper", "scene=calvin_scene_D", "robot=panda_longer_finger", "use_vr=false")
TASKS_CONFIG = Path("conf") / "tasks" / "new_playtable_tasks.yaml"


def resolve_calvin_env_root(path: str | os.PathLike | None = None) -> Path:
    """The calvin_env checkout from the argument or ``$CALVIN_ENV_ROOT``; ValueError naming what to fix."""
    raw = path if path else os.environ.get(ENV_VAR)
    if not raw:
        raise ValueError(
            f"CALVIN needs a calvin_env checkout: pass --calvin-env-root PATH or set {ENV_VAR} "
            "(git clone https://github.com/mees/calvin_env; install its requirements)"
        )
    root = Path(raw).expanduser().resolve()
    missing = [
        p for p in ("calvin_env", "conf", "data", Path("conf") / f"{CONFIG_NAME}.yaml") if not (root / p).exists()
    ]
    if missing:
        raise ValueError(f"{root} is not a calvin_env checkout (missing {', '.join(map(str, missing))})")
    return root


def calvin_env_commit(root: Path) -> str:
    """The checkout's HEAD commit, with ``-dirty`` when tracked files are modified (calvin_env needs git too)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise ValueError(f"{root} must be a git checkout of calvin_env (its constructor needs one): {exc}") from None
    return commit + ("-dirty" if dirty else "")


@dataclass
class CalvinSimulator:
    env: Any
    oracle: Any
    root: Path
    commit: str
    renderer: str

    def close(self) -> None:
        close = getattr(self.env, "close", None)
        if close is not None:
            close()
            # calvin_env's close is not idempotent and runs again from __del__: mark the client as gone
            if hasattr(self.env, "cid"):
                self.env.cid = -1


def make_calvin_env(root: str | os.PathLike | None = None, renderer: str = "tiny") -> CalvinSimulator:
    """Build the evaluation env and the task oracle from a calvin_env checkout.

    ``renderer``: ``egl`` (pybullet's EGL plugin; closest to how the dataset was rendered, also runs on Mesa
    llvmpipe) or ``tiny`` (pybullet's CPU TinyRenderer; ~30% faster on CPU, frames differ by ~20/255).
    """
    if renderer not in RENDERERS:
        raise ValueError(f"renderer must be one of {RENDERERS}, got {renderer!r}")
    root = resolve_calvin_env_root(root)
    commit = calvin_env_commit(root)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))  # the checkout may not be pip-installed; its package sits at the root
    try:
        import calvin_env
        import hydra
        from hydra import compose, initialize_config_dir
        from hydra.core.global_hydra import GlobalHydra
        from omegaconf import OmegaConf
    except ImportError as exc:
        raise ValueError(
            f"calvin_env or one of its dependencies does not import ({exc}); install its requirements "
            f"(pip install -r {root / 'requirements.txt'}) into this environment"
        ) from None

    imported_from = Path(calvin_env.__file__).resolve().parent
    if root not in imported_from.parents:  # another install shadows the checkout: the recorded commit would lie
        raise ValueError(f"calvin_env imports from {imported_from}, not from {root}; uninstall the other copy")
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(root / "conf"), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(OVERRIDES))
    env = hydra.utils.instantiate(cfg.env, show_gui=False, use_vr=False, use_scene_info=True, use_egl=renderer == "egl")
    oracle = hydra.utils.instantiate(OmegaConf.load(root / TASKS_CONFIG))
    return CalvinSimulator(env=env, oracle=oracle, root=root, commit=commit, renderer=renderer)

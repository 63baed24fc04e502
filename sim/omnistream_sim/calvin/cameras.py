"""CALVIN's two cameras under the names policies use: the one mapping the evaluation, the CALVIN training reader
and the CALVIN -> LeRobot converter share, so a policy trained on ``static`` + ``gripper`` finds the same names
in the evaluation's observations (and in ``observation.images.<name>`` of a converted dataset).

calvin_env and the dataset files call them ``rgb_static`` (200 x 200) and ``rgb_gripper`` (84 x 84, on the hand).
"""

from __future__ import annotations

# policy / dataset camera name -> calvin_env observation key (``rgb_obs[...]``) and dataset npz key
CAMERAS: dict[str, str] = {"static": "rgb_static", "gripper": "rgb_gripper"}


def calvin_key(camera: str) -> str:
    """The calvin_env / dataset key of a camera name; a clear error for any other name (e.g. ``wrist``)."""
    if camera not in CAMERAS:
        raise ValueError(f"CALVIN has the cameras {list(CAMERAS)} (keys {list(CAMERAS.values())}), not {camera!r}")
    return CAMERAS[camera]


def named_images(rgb_obs: dict) -> dict:
    """calvin_env's ``rgb_obs`` -> {camera name: image} for the cameras present."""
    return {name: rgb_obs[key] for name, key in CAMERAS.items() if key in rgb_obs}

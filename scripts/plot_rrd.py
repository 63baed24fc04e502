"""A picture of an `omnistream view` recording, from the `.rrd` alone (read back with Rerun's own reader): camera
frames and depth at a few header stamps, the world point cloud seen from above with the camera path, and the VLA's
actions over time. For READMEs and reports where a screenshot of the viewer cannot be taken (headless machines).

    .venv/bin/python scripts/plot_rrd.py live.rrd --out docs/view/live.png
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np


def _seconds(times, t0) -> np.ndarray:
    return np.array([(np.datetime64(t, "ns") - t0) / np.timedelta64(1, "s") for t in times], dtype=np.float64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rrd", help="a recording written by `omnistream view --save`")
    parser.add_argument("--out", required=True, help="output PNG")
    parser.add_argument("--frames", type=int, default=4, help="camera frames shown (default 4)")
    parser.add_argument("--dpi", type=int, default=80)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from omnistream_perception import visualization as vis

    rrd = vis.read_rrd(args.rrd)
    image_times, blobs = rrd.column(vis.IMAGE, "EncodedImage:blob", vis.ROS_TIMELINE, mono=True)
    depth_times, depths = rrd.column(vis.DEPTH, "DepthImage:buffer", vis.ROS_TIMELINE, mono=True)
    _, formats = rrd.column(vis.DEPTH, "DepthImage:format", vis.ROS_TIMELINE, mono=True)
    _, clouds = rrd.column(vis.POINTS, "Points3D:positions", vis.ROS_TIMELINE)
    _, colours = rrd.column(vis.POINTS, "Points3D:colors", vis.ROS_TIMELINE)
    _, strips = rrd.column(vis.CAMERA_PATH, "LineStrips3D:strips", vis.ROS_TIMELINE, mono=True)
    action_times, actions = rrd.column(vis.ACTION, "Scalars:scalars", vis.ROS_TIMELINE)
    _, instructions = rrd.column(vis.INSTRUCTION, "TextDocument:text", vis.ROS_TIMELINE, mono=True)
    if not depths:
        raise SystemExit(f"{args.rrd}: no depth in the recording (entity {vis.DEPTH})")
    t0 = np.datetime64(depth_times[0], "ns")

    picks = np.linspace(0, len(depths) - 1, min(args.frames, len(depths))).round().astype(int)
    fig = plt.figure(figsize=(2.3 * len(picks), 7.2))
    grid = fig.add_gridspec(3, len(picks), height_ratios=[1, 1, 1.4])
    image_ns = np.array([np.datetime64(t, "ns").astype(np.int64) for t in image_times])
    for c, i in enumerate(picks):
        stamp = np.datetime64(depth_times[i], "ns")
        ax = fig.add_subplot(grid[0, c])
        if len(image_ns):  # the camera frame with the depth's stamp (perception_node keeps the image's header)
            j = int(np.argmin(np.abs(image_ns - stamp.astype(np.int64))))
            ax.imshow(Image.open(io.BytesIO(bytes(blobs[j]))).convert("RGB"))
        ax.set_title(f"t = {(stamp - t0) / np.timedelta64(1, 's'):.2f} s", fontsize=8)
        ax.set_axis_off()
        width, height = formats[i]["width"], formats[i]["height"]
        depth = np.frombuffer(bytes(depths[i]), np.float32).reshape(height, width)
        ax = fig.add_subplot(grid[1, c])
        ax.imshow(depth, cmap="turbo")
        ax.set_axis_off()
    fig.axes[0].text(-0.08, 0.5, "camera", transform=fig.axes[0].transAxes, rotation=90, va="center", fontsize=8)
    fig.axes[1].text(-0.08, 0.5, "depth", transform=fig.axes[1].transAxes, rotation=90, va="center", fontsize=8)

    half = max(1, len(picks) // 2)
    ax = fig.add_subplot(grid[2, :half])
    if clouds:  # seen from above: world x (right) against z (forward, the first camera's optical axis)
        xyz = np.asarray(clouds[-1], dtype=np.float32)
        rgb = np.asarray(colours[-1], dtype=np.uint32) if colours else None
        colour = None
        if rgb is not None and len(rgb) == len(xyz):  # packed 0xRRGGBBAA
            colour = np.stack([(rgb >> 24) & 255, (rgb >> 16) & 255, (rgb >> 8) & 255], axis=1) / 255.0
        ax.scatter(xyz[:, 0], xyz[:, 2], s=1, c=colour, linewidths=0)
    if strips:
        path = np.asarray(strips[-1], dtype=np.float32)
        ax.plot(path[:, 0], path[:, 2], "k.-", lw=1, ms=3, label="camera path")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("world x", fontsize=8)
    ax.set_ylabel("world z (forward)", fontsize=8)
    ax.set_title(f"points (last cloud) and camera path, {len(clouds)} clouds", fontsize=8)
    ax.set_aspect("equal", adjustable="datalim")
    ax.tick_params(labelsize=7)

    ax = fig.add_subplot(grid[2, half:])
    stop_times, stops = rrd.column(vis.STOP, "Scalars:scalars", vis.ROS_TIMELINE, mono=True)
    if actions:
        values = np.asarray(actions, dtype=np.float64)
        seconds = _seconds(action_times, t0)
        for d, name in enumerate(vis.ACTION_NAMES[:6]):
            ax.plot(seconds, values[:, d], lw=1, label=name)
        gripper = ax.twinx()  # +-1, far larger than the per-step motion
        gripper.step(seconds, values[:, 6], where="post", color="k", lw=0.8, alpha=0.6, label="gripper")
        gripper.set_ylim(-1.5, 1.5)
        gripper.tick_params(labelsize=7)
        gripper.set_ylabel("gripper", fontsize=8)
        if stops:
            stopped = np.asarray(stops) > 0.5
            ax.fill_between(_seconds(stop_times, t0), 0, 1, where=stopped, step="post", color="red", alpha=0.15,
                            transform=ax.get_xaxis_transform(), label="stop")  # fmt: skip
        ax.legend(fontsize=6, ncol=4, loc="upper left")
    ax.set_xlabel("header stamp (s)", fontsize=8)
    ax.set_ylabel("per-step motion", fontsize=8)
    ax.set_title(f"VLA actions ({len(actions)}, {int(np.sum(np.asarray(stops) > 0.5))} stops)", fontsize=8)
    ax.tick_params(labelsize=7)
    title = f"omnistream view: {Path(args.rrd).name}"
    if instructions:
        title += f' - instruction "{instructions[-1]}"'
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

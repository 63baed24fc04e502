"""`omnistream data ...`: convert recordings (rosbags, CALVIN) to LeRobot v3.0 and look at the result."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from omnistream_cli.errors import UserError, user_errors


def register(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help="datasets: rosbag/CALVIN -> LeRobot v3.0, info, view")
    group = data.add_subparsers(dest="data", metavar="ACTION")
    group.required = True

    p = group.add_parser(
        "bag-to-lerobot", help="convert rosbag2 bags (e.g. from recorder_node) to a LeRobot v3.0 dataset"
    )
    p.add_argument("bags", nargs="+", metavar="BAG", help="rosbag2 directories (each has a metadata.yaml)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--camera-topics", required=True, help="comma-separated Image/CompressedImage topics")
    p.add_argument(
        "--camera-names",
        default=None,
        help="comma-separated dataset camera names, one per topic (default: from the topic names)",
    )
    p.add_argument("--action-topic", required=True, help="EndEffectorAction, JointState or Float32MultiArray topic")
    p.add_argument(
        "--state-topic", default=None, help="JointState, PoseStamped, EndEffectorAction or Float32MultiArray"
    )
    p.add_argument("--instruction-topic", default=None, help="std_msgs/String topic with the instruction")
    p.add_argument("--task", default=None, help="task text for frames without any instruction")
    p.add_argument("--fps", type=int, default=None, help="frame rate of the dataset (default: the first camera's)")
    p.add_argument(
        "--alignment",
        choices=["nearest", "interpolate"],
        default="nearest",
        help="how action/state are put on the frame clock (images always use the nearest frame)",
    )
    p.add_argument("--episode-topic", default=None, help="episode events topic (default: any .../episode_events)")
    p.add_argument("--only-successful", action="store_true", help="keep only episodes marked successful")
    p.add_argument(
        "--max-gap",
        type=float,
        default=None,
        metavar="SECONDS",
        help="a camera silent this long ends the episode (never filled with frames); default: max(1 s, 3 frames)",
    )
    p.add_argument(
        "--no-instruction-split",
        action="store_true",
        help="bags without episode events: keep a new instruction in the same episode (default: a new episode)",
    )
    p.add_argument("--summary", default=None, metavar="JSON", help="also write the conversion summary here")
    p.add_argument("--robot-type", default=None, help="robot_type written to meta/info.json")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_bag_to_lerobot)

    p = group.add_parser("calvin-to-lerobot", help="convert a CALVIN split folder (npz + language) to LeRobot v3.0")
    p.add_argument("split_dir", help="e.g. task_D_D/training (episode_*.npz, lang_annotations/)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--cameras", default="static,gripper", help="comma-separated: static, gripper")
    p.add_argument("--action", choices=["rel_actions", "actions"], default="rel_actions", help="which CALVIN action")
    p.add_argument("--no-language", action="store_true", help="use ep_start_end_ids.npy episodes with --task")
    p.add_argument("--task", default=None, help="task text when --no-language")
    p.add_argument("--fps", type=int, default=30, help="frame rate (CALVIN records at 30 Hz)")
    p.add_argument("--max-episodes", type=int, default=None, help="convert only the first N episodes")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(handler=_calvin_to_lerobot)

    p = group.add_parser("info", help="summarise a LeRobot v3.0 dataset")
    p.add_argument("root", help="dataset directory")
    p.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    p.set_defaults(handler=_info)

    p = group.add_parser("view", help="render an episode's frames + action plots to a PNG or MP4")
    p.add_argument("root", help="dataset directory")
    p.add_argument("--episode", type=int, default=0, help="episode index (default 0)")
    p.add_argument("--out", default=None, help="output .png or .mp4 (default episode_<k>.png in the current dir)")
    p.add_argument("--frames", type=int, default=6, help="frames shown in the PNG strip (default 6)")
    p.add_argument("--rerun", default=None, metavar="FILE.rrd", help="log the episode to a Rerun file (no PNG)")
    p.set_defaults(handler=_view)


def _bag_to_lerobot(args: argparse.Namespace) -> int:
    from omnistream_train.bag_to_lerobot import BagConversionConfig, convert_bags

    with user_errors(ValueError, FileExistsError, FileNotFoundError):
        cfg = BagConversionConfig(
            camera_topics=[t.strip() for t in args.camera_topics.split(",") if t.strip()],
            camera_names=[n.strip() for n in args.camera_names.split(",")] if args.camera_names else None,
            action_topic=args.action_topic,
            state_topic=args.state_topic,
            instruction_topic=args.instruction_topic,
            fps=args.fps,
            alignment=args.alignment,
            default_task=args.task,
            episode_events_topic=args.episode_topic,
            only_successful=args.only_successful,
            robot_type=args.robot_type,
            max_gap_s=args.max_gap,
            split_on_instruction=not args.no_instruction_split,
        )
        summary = convert_bags([Path(b) for b in args.bags], Path(args.out), cfg, overwrite=args.overwrite)
    for ep in summary["episode_details"]:
        print(
            f"episode {ep['episode_index']}: {ep['frames']} frames, {ep['dropped_images']} images dropped, "
            f"{ep['filled_frames']} frames filled, task {' / '.join(ep['tasks'])!r} ({Path(ep['source_bag']).name})"
        )
    print(
        f"wrote {summary['episodes']} episodes, {summary['frames']} frames at {summary['fps']} fps to {summary['out']}"
        + (f" ({summary['skipped_episodes']} skipped)" if summary["skipped_episodes"] else "")
        + f"; {summary['dropped_images']} images dropped, {summary['filled_frames']} frames filled"
    )
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=2))
    return 0


def _calvin_to_lerobot(args: argparse.Namespace) -> int:
    from omnistream_train.calvin_to_lerobot import CalvinConversionConfig, convert_calvin

    with user_errors(ValueError, FileExistsError, FileNotFoundError):
        cfg = CalvinConversionConfig(
            cameras=tuple(c.strip() for c in args.cameras.split(",") if c.strip()),
            action_key=args.action,
            use_language=not args.no_language,
            default_task=args.task,
            fps=args.fps,
            max_episodes=args.max_episodes,
        )
        summary = convert_calvin(Path(args.split_dir), Path(args.out), cfg, overwrite=args.overwrite)
    print(
        f"wrote {summary['episodes']} episodes, {summary['frames']} frames at {summary['fps']} fps to {summary['out']}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from omnistream_train.lerobot_dataset import summarize

    with user_errors():
        summary = summarize(Path(args.root))
    if args.as_json:
        print(json.dumps(summary, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{summary['root']}[/bold]  LeRobot {summary['codebase_version']}  {summary['fps']} fps  "
        f"{summary['episodes']} episodes  {summary['frames']} frames ({summary['duration_s']} s)  "
        f"videos {summary['video_mb']} MB"
    )
    lengths = summary["episode_length"]
    console.print(f"episode length: min {lengths['min']}, mean {lengths['mean']:.1f}, max {lengths['max']}")
    table = Table("feature", "dtype", "shape")
    for key, feat in summary["features"].items():
        table.add_row(key, feat["dtype"], str(feat["shape"]))
    console.print(table)
    console.print("tasks:")
    for i, task in enumerate(summary["tasks"]):
        console.print(f"  {i}: {task}", markup=False)
    if summary["episode_columns_extra"]:
        console.print(f"episode columns: {', '.join(summary['episode_columns_extra'])}")
    return 0


def _view(args: argparse.Namespace) -> int:
    from omnistream_train.lerobot_dataset import LeRobotDataset

    with user_errors():
        ds = LeRobotDataset(Path(args.root), episodes=[args.episode], image_format="uint8_hwc")
    if args.rerun is not None:
        from omnistream_perception.visualization import RerunLog, log_dataset_episode

        if not args.rerun.endswith(".rrd"):
            raise UserError(f"--rerun must name an .rrd file, got {args.rerun}")
        with RerunLog("omnistream_dataset", save=args.rerun) as log:
            frames = log_dataset_episode(log, ds, args.episode)
        print(f"wrote {args.rerun} ({frames} frames of episode {args.episode})")
        if args.out is None:
            return 0
    out = Path(args.out or f"episode_{args.episode}.png")
    if out.suffix.lower() not in (".png", ".mp4"):
        raise UserError(f"--out must end in .png or .mp4, got {out.name}")
    render_episode(ds, args.episode, out, num_frames=args.frames)
    print(f"wrote {out}")
    return 0


def _episode_arrays(ds, episode: int):
    import numpy as np

    start, stop = ds.episode_frames(episode)
    items = [ds[i] for i in range(start, stop)]
    cams = ds.meta.video_keys
    images = {k: np.stack([it[k] for it in items]) for k in cams}
    numeric = {k: np.stack([it[k].numpy() for it in items]) for k in ds.numeric_keys}
    return items, images, numeric


def _plot_numeric(numeric: dict, names: dict, fps: int, width_px: int):
    """A figure with one panel per numeric feature (action, state) over the episode's time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(numeric), 1, figsize=(max(6, width_px / 100), 2.2 * len(numeric)), squeeze=False)
    for ax, (key, values) in zip(axes[:, 0], numeric.items()):
        t = np.arange(len(values)) / fps
        labels = names.get(key) or [f"{key}[{d}]" for d in range(values.shape[1])]
        for d in range(values.shape[1]):
            ax.plot(t, values[:, d], label=labels[d] if d < len(labels) else str(d))
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("time (s)", fontsize=8)
        ax.legend(fontsize=6, ncol=min(values.shape[1], 8), loc="upper right")
    fig.tight_layout()
    return fig, axes[:, 0]


def render_episode(ds, episode: int, out: Path, num_frames: int = 6) -> None:
    """PNG: a strip of frames per camera above plots of every numeric feature. MP4: the episode played
    with the cameras side by side over the plots and a cursor at the current time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    items, images, numeric = _episode_arrays(ds, episode)
    names = {k: ds.meta.features[k].get("names") for k in numeric}
    task = items[0]["task"]
    if out.suffix.lower() == ".png":
        picks = np.linspace(0, len(items) - 1, min(num_frames, len(items))).round().astype(int)
        rows = len(images) + len(numeric)
        fig = plt.figure(figsize=(2.2 * len(picks), 2.2 * rows + 0.5))
        grid = fig.add_gridspec(rows, len(picks))
        for r, (key, frames) in enumerate(images.items()):
            for c, i in enumerate(picks):
                ax = fig.add_subplot(grid[r, c])
                ax.imshow(frames[i])
                ax.set_axis_off()
                ax.set_title(f"{key.split('.')[-1]} t={i / ds.fps:.2f}s", fontsize=7)
        for r, (key, values) in enumerate(numeric.items(), start=len(images)):
            ax = fig.add_subplot(grid[r, :])
            t = np.arange(len(values)) / ds.fps
            for d in range(values.shape[1]):
                label = (names[key] or [])[d] if names[key] and d < len(names[key]) else f"{d}"
                ax.plot(t, values[:, d], label=label)
            for i in picks:
                ax.axvline(i / ds.fps, color="grey", lw=0.5)
            ax.set_title(key, fontsize=8)
            ax.legend(fontsize=6, ncol=min(values.shape[1], 8), loc="upper right")
        fig.suptitle(f"episode {episode}: {task}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
        plt.close(fig)
        return

    import av

    # Cameras side by side, each padded to the tallest one: (T, H, sumW, 3).
    tallest = max(frames.shape[1] for frames in images.values())
    padded = [np.pad(f, ((0, 0), (0, tallest - f.shape[1]), (0, 0), (0, 0))) for f in images.values()]
    strip = np.concatenate(padded, axis=2)
    scale = max(1, 256 // strip.shape[1])
    strip = strip.repeat(scale, axis=1).repeat(scale, axis=2)
    width = strip.shape[2]
    if numeric:
        fig, axes = _plot_numeric(numeric, names, ds.fps, width)
        fig.set_size_inches(width / 100, fig.get_size_inches()[1])
        fig.canvas.draw()
        plot = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
        # Pixel column of each frame's time on the first panel's x axis (the panels share the time range).
        x0, x1 = axes[0].get_xlim()
        bbox = axes[0].get_window_extent()
        cols = bbox.x0 + (np.arange(len(items)) / ds.fps - x0) / max(x1 - x0, 1e-9) * bbox.width
        plt.close(fig)
    else:
        plot, cols = np.zeros((0, width, 3), np.uint8), None
    height = strip.shape[1] + plot.shape[0]
    height += height % 2
    with av.open(str(out), "w") as container:
        stream = container.add_stream("libsvtav1", rate=ds.fps)
        stream.width, stream.height, stream.pix_fmt = width + width % 2, height, "yuv420p"
        for i in range(len(items)):
            canvas = np.zeros((height, stream.width, 3), np.uint8)
            canvas[: strip.shape[1], :width] = strip[i]
            if plot.size:
                panel = plot.copy()
                c = int(np.clip(cols[i], 0, panel.shape[1] - 1))
                panel[:, max(0, c - 1) : c + 1] = (220, 30, 30)
                canvas[strip.shape[1] : strip.shape[1] + panel.shape[0], : panel.shape[1]] = panel[:, :width]
            frame = av.VideoFrame.from_ndarray(canvas, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

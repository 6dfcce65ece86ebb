"""Data for every stage of CMD: video I/O, the datasets, and the training harness.

- Video I/O through PyAV: `read_video` / `write_video` move uint8 frames (L, H, W, 3)
  between files and numpy; `video_to_uint8` / `uint8_to_video` convert to and from the
  model's float videos (L, 3, H, W) in [-1, 1].
- Datasets yield `(video, caption)`, video float32 (L, 3, H, W) in [-1, 1]:
  * `ShapesDataset`, the embedded default: procedurally drawn coloured shapes that move,
    grow, shrink or rotate, with a caption built from what was drawn. It needs no
    download and is small enough to train the tiny presets on a CPU.
  * `VideoCSVDataset`: a CSV of `path,caption` rows, or the `videoid,name` rows of
    WebVid-10M (the text-video data of the paper's headline FVD).
  * `VideoFolderDataset`: UCF-101-style class folders; the class name is the caption.
  `make_dataset(spec, ...)` picks one from a string: "shapes", a .csv file, or a folder.
- The training harness shared by all stages (below the datasets).
"""
import copy
import csv
import json
import os
import re
import time
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


# ----------------------------------------------------------------------------- video I/O

class VideoError(ValueError):
    """A video file that cannot be read; the message names the file."""


def read_video(path):
    """Decode every frame of an mp4/avi/webm/gif/... file -> np.uint8 (L, H, W, 3)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read video {path}: {e}") from e
    if not frames or any(f.shape != frames[0].shape for f in frames):
        raise VideoError(f"{path}: no decodable frames, or frames of changing size")
    return np.stack(frames)


def write_video(path, frames, fps=8):
    """Write np.uint8 frames (L, H, W, 3) as .mp4 (H.264) or .gif, chosen by the suffix.

    H.264 in yuv420p (the pixel format every player accepts) stores colour at half
    resolution, so both sides must be even: an odd height or width is padded by one
    repeated edge row/column, and reading the file back gives the padded size.
    GIF stores 256 colours per frame and delays in 1/100 s (8 fps plays at 8.33 fps).
    """
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"write_video wants uint8 frames (L, H, W, 3), got {frames.dtype} {frames.shape}")
    suffix = Path(path).suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"write_video writes .mp4 or .gif, not {path}")
    if suffix == ".mp4":
        frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w") as container:
        codec = "libx264" if suffix == ".mp4" else "gif"
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))  # 8, 29.97, ...
        stream.height, stream.width = frames.shape[1:3]
        if suffix == ".mp4":
            stream.pix_fmt, stream.options = "yuv420p", {"crf": "18"}  # crf 18: visually lossless
            images = [av.VideoFrame.from_ndarray(f, format="rgb24") for f in frames]
        else:
            stream.pix_fmt = "pal8"
            indices, palette = _palettize(frames)
            images = [av.VideoFrame.from_ndarray((i, palette), format="pal8") for i in indices]
        for image in images:
            container.mux(stream.encode(image))
        container.mux(stream.encode())  # flush the encoder


def write_image(path, image):
    """Write np.uint8 (H, W, 3) as a PNG (through Pillow, which torchvision already needs)."""
    from PIL import Image
    Image.fromarray(np.asarray(image)).save(path)


def _palettize(frames):
    """One 256-colour palette for a whole video: colours are grouped into bins of 5 bits
    per channel, the 256 most frequent bins enter the palette with their mean colour,
    and every other bin maps to its nearest entry.
    Returns palette indices (L, H, W) and the palette as ARGB rows (256, 4)."""
    q = (frames >> 3).astype(np.int64)
    _, inverse = np.unique((q[..., 0] << 10) | (q[..., 1] << 5) | q[..., 2], return_inverse=True)
    inverse = inverse.ravel()
    counts = np.bincount(inverse)
    means = np.stack([np.bincount(inverse, frames[..., c].ravel()) for c in range(3)], -1) / counts[:, None]
    popular = means[np.argsort(-counts, kind="stable")[:256]]
    nearest = ((means[:, None] - popular[None]) ** 2).sum(-1).argmin(1)
    palette = np.zeros((256, 4), np.uint8)
    palette[:, 0] = 255  # opaque
    palette[: len(popular), 1:] = popular.round()
    return nearest[inverse].reshape(frames.shape[:3]).astype(np.uint8), palette


def video_to_uint8(video):
    """float tensor (..., 3, H, W) in [-1, 1] -> np.uint8 (..., H, W, 3)."""
    video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.movedim(-3, -1).cpu().numpy()


def uint8_to_video(frames):
    """np.uint8 (..., H, W, 3) -> float32 tensor (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


# ------------------------------------------------------------------ the shapes world

# Saturated colours on neutral (grey) backgrounds, so a shape's colour is always
# detectable: no colour is close to any background or to another colour.
COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 90, 230),
          "yellow": (235, 210, 40), "purple": (160, 50, 220), "cyan": (40, 200, 210)}
BACKGROUNDS = {"dark": ((20, 20, 20), (20, 20, 20)),  # (top colour, bottom colour)
               "light": ((225, 225, 225), (225, 225, 225)),
               "gradient": ((30, 30, 30), (170, 170, 170))}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # image y points down
MOTIONS = (*DIRECTIONS, "growing", "shrinking", "rotating")
# (color, shape, motion) triples the "train" split never draws, for any shape of a
# video, and the "heldout" split draws exclusively (one shape per video): a test of
# whether a model composes attributes it has only seen apart.
HELDOUT_COMBOS = (("red", "triangle", "up"), ("blue", "circle", "growing"),
                  ("green", "square", "left"), ("yellow", "triangle", "rotating"))

# Geometry, in fractions of the frame side, so attributes render at any size and length.
TRAVEL = 1 / 3    # distance a moving shape covers over the clip
SCALES = {"growing": (0.7, 1.4), "shrinking": (1.4, 0.7)}  # radius multiplier, first -> last frame
TURN = np.pi / 2  # angle a rotating shape turns over the clip
POLYGONS = {"square": (4, 0.8), "triangle": (3, 0.7)}  # (sides, apothem / radius); a circle's radius is 1
EXTENT = 1.4      # farthest reach of any shape from its centre, in radii (the triangle's corners)
MARGIN = 0.05     # free space kept between a shape and the frame's edge
SUPERSAMPLE = 4   # anti-aliasing: draw at 4x4 sub-pixels per pixel, then average


def _trajectory(shape, t):
    """Centre x, y, radius and angle of one shape at clip times t in [0, 1]."""
    dx, dy = DIRECTIONS.get(shape["motion"], (0, 0))
    first, last = SCALES.get(shape["motion"], (1, 1))
    angle = TURN * t if shape["motion"] == "rotating" else np.zeros_like(t)
    radius = shape["radius"] * (first + (last - first) * t)
    return shape["x"] + TRAVEL * dx * t, shape["y"] + TRAVEL * dy * t, radius, angle


def _overlap(a, b):
    """Do the bounding circles of two shapes ever touch during the clip?"""
    ax, ay, ar, _ = _trajectory(a, np.linspace(0, 1, 33))
    bx, by, br, _ = _trajectory(b, np.linspace(0, 1, 33))
    return bool(np.any(np.hypot(ax - bx, ay - by) < EXTENT * (ar + br)))


def _sample_shape(rng, split):
    def pick(options):
        return options[rng.integers(len(options))]

    while True:  # rejection sampling: few draws are rejected
        if split == "heldout":
            color, shape, motion = pick(HELDOUT_COMBOS)
        else:
            color, shape, motion = pick(list(COLORS)), pick(SHAPES), pick(MOTIONS)
        if (shape, motion) == ("circle", "rotating"):
            continue  # a rotating circle would look still
        if split == "train" and (color, shape, motion) in HELDOUT_COMBOS:
            continue
        radius = rng.uniform(0.10, 0.15)
        # the start is drawn so that the whole path stays MARGIN inside the frame
        reach = MARGIN + EXTENT * radius * max(SCALES.get(motion, (1, 1)))
        dx, dy = DIRECTIONS.get(motion, (0, 0))
        x = rng.uniform(reach - min(0, TRAVEL * dx), 1 - reach - max(0, TRAVEL * dx))
        y = rng.uniform(reach - min(0, TRAVEL * dy), 1 - reach - max(0, TRAVEL * dy))
        return {"color": color, "shape": shape, "motion": motion,
                "x": float(x), "y": float(y), "radius": float(radius)}


def _sample_attributes(rng, max_shapes, split):
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    n = 1 if split == "heldout" else rng.integers(1, max_shapes + 1)
    while True:  # two shapes must differ in colour and never touch; redraw both until they do
        shapes = [_sample_shape(rng, split) for _ in range(n)]
        if n == 1 or (shapes[0]["color"] != shapes[1]["color"] and not _overlap(*shapes)):
            return {"background": background, "shapes": shapes}


def caption_for(attributes):
    """'a red circle moving left and a blue square growing on a dark background'."""
    def phrase(s):
        motion = f"moving {s['motion']}" if s["motion"] in DIRECTIONS else s["motion"]  # "growing"
        return f"a {s['color']} {s['shape']} {motion}"
    return " and ".join(phrase(s) for s in attributes["shapes"]) + f" on a {attributes['background']} background"


def render_shapes(attributes, size=32, frames=16):
    """Draw a video of the given attributes -> np.uint8 (frames, size, size, 3)."""
    top, bottom = (np.array(c, np.float64) for c in BACKGROUNDS[attributes["background"]])
    ramp = ((np.arange(size) + 0.5) / size)[:, None, None]  # (H, 1, 1), 0 at the top
    video = np.broadcast_to(top + (bottom - top) * ramp, (frames, size, size, 3))
    n = size * SUPERSAMPLE
    grid = (np.arange(n) + 0.5) / n  # sub-pixel centres, in fractions of the frame
    for shape in attributes["shapes"]:
        cx, cy, r, angle = (a[:, None, None] for a in _trajectory(shape, np.linspace(0, 1, frames)))
        x, y = grid[None, None, :] - cx, grid[None, :, None] - cy  # (L, 1, n), (L, n, 1)
        if shape["shape"] == "circle":
            inside = x**2 + y**2 <= r**2
        else:  # a regular polygon: inside every edge, edge k's outward normal at angle phi
            sides, apothem = POLYGONS[shape["shape"]]
            inside = np.ones((frames, n, n), bool)
            for k in range(sides):
                phi = angle + np.pi / 2 + 2 * np.pi * k / sides  # k = 0: the bottom edge
                inside &= x * np.cos(phi) + y * np.sin(phi) <= apothem * r
        alpha = inside.reshape(frames, size, SUPERSAMPLE, size, SUPERSAMPLE).mean((2, 4))[..., None]
        video = video * (1 - alpha) + np.array(COLORS[shape["color"]]) * alpha
    return video.round().astype(np.uint8)


class ShapesDataset(torch.utils.data.Dataset):
    """Procedural captioned videos; item i is the same for the same (i, seed).

    attributes(i) -> {"background": "dark", "shapes": [{"color", "shape", "motion",
    "x", "y", "radius"}, ...]}, x and y the start centre and radius in fractions of the
    frame. split="train" never draws a HELDOUT_COMBOS triple; split="heldout" draws only
    those, one shape per video. max_shapes (1 or 2) bounds the shapes per video.
    """

    def __init__(self, num_videos=10_000, size=32, frames=16, seed=0, max_shapes=1, split="train"):
        if max_shapes not in (1, 2) or split not in ("train", "heldout"):
            raise ValueError(f"want max_shapes 1 or 2 and split 'train' or 'heldout', got {max_shapes}, {split!r}")
        self.num_videos, self.size, self.frames, self.seed = num_videos, size, frames, seed
        self.max_shapes, self.split = max_shapes, split

    def __len__(self):
        return self.num_videos

    def attributes(self, i):
        return _sample_attributes(np.random.default_rng([self.seed, i]), self.max_shapes, self.split)

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(i)
        attributes = self.attributes(i)
        return uint8_to_video(render_shapes(attributes, self.size, self.frames)), caption_for(attributes)


# ------------------------------------------------------------------ video file datasets

VIDEO_SUFFIXES = (".mp4", ".avi", ".webm", ".gif", ".mkv", ".mov")


class _VideoFileDataset(torch.utils.data.Dataset):
    """Shared by the file datasets: a random clip of `frames` frames taken every `stride`
    frames, shorter side resized to `size` and centre-cropped to size x size.

    Files are only opened when an item is asked for (a listing can hold millions).
    A file that is unreadable or too short is skipped with a warning, remembered in
    `self.bad` and counted in `self.skipped` (per process: each DataLoader worker has
    its own count), and the next index is tried instead.
    """

    def __init__(self, source, items, frames, size, stride):
        if not items:
            raise ValueError(f"no videos listed in {source}")
        self.source, self.items = source, items  # items: list of (path, caption)
        self.frames, self.size, self.stride = frames, size, stride
        self.bad = set()

    @property
    def skipped(self):
        return len(self.bad)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        for k in range(i, i + len(self.items)):
            k %= len(self.items)
            if k in self.bad:
                continue
            path, caption = self.items[k]
            try:
                return self.load_clip(path), caption
            except VideoError as e:
                self.bad.add(k)
                warnings.warn(f"skipping video: {e}")
        raise RuntimeError(f"no usable video in {self.source}: all {len(self.items)} failed to decode or "
                           f"have fewer than {(self.frames - 1) * self.stride + 1} frames; check the paths, "
                           f"the files and the frames/stride options")

    def load_clip(self, path):
        video = read_video(path)  # the whole file: clips of UCF-101 / WebVid last seconds
        span = (self.frames - 1) * self.stride + 1
        if len(video) < span:
            raise VideoError(f"{path} has {len(video)} frames, fewer than the {span} needed")
        start = int(torch.randint(len(video) - span + 1, ()))  # torch's RNG: seeded per DataLoader worker
        clip = torch.from_numpy(video[start:start + span:self.stride]).permute(0, 3, 1, 2).float()
        h, w = clip.shape[-2:]
        scale = self.size / min(h, w)
        clip = F.interpolate(clip, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                             mode="bilinear", antialias=True)
        top, left = (clip.shape[-2] - self.size) // 2, (clip.shape[-1] - self.size) // 2
        clip = clip[..., top:top + self.size, left:left + self.size]
        return (clip / 127.5 - 1).clamp(-1, 1)  # (L, 3, size, size)


class VideoCSVDataset(_VideoFileDataset):
    """A CSV with header `path,caption` (paths relative to the CSV's folder), or WebVid's
    `videoid,name`, read as `<video_folder>/<videoid>.mp4` (default: the CSV's folder)."""

    def __init__(self, csv_path, frames=16, size=32, stride=1, video_folder=None):
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"no such CSV file: {csv_path}")
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            rows, columns = list(reader), set(reader.fieldnames or ())
        if {"path", "caption"} <= columns:
            items = [(str(csv_path.parent / row["path"]), row["caption"]) for row in rows]
        elif {"videoid", "name"} <= columns:
            folder = Path(video_folder) if video_folder else csv_path.parent
            items = [(str(folder / f"{row['videoid']}.mp4"), row["name"]) for row in rows]
        else:
            raise ValueError(f"{csv_path}: want columns 'path,caption' or 'videoid,name', got {sorted(columns)}")
        super().__init__(csv_path, items, frames, size, stride)


def class_caption(name):
    """'ApplyEyeMakeup' or 'apply_eye_makeup' -> 'apply eye makeup'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)  # a space before each inner capital
    return " ".join(re.split(r"[\s_-]+", spaced.lower())).strip()


class VideoFolderDataset(_VideoFileDataset):
    """UCF-101 layout: `root/<ClassName>/**/<video>`; the caption is the class name in words."""

    def __init__(self, root, frames=16, size=32, stride=1):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no such video folder: {root}")
        items = [(str(path), class_caption(folder.name))
                 for folder in sorted(root.iterdir()) if folder.is_dir()
                 for path in sorted(folder.rglob("*")) if path.suffix.lower() in VIDEO_SUFFIXES]
        super().__init__(root, items, frames, size, stride)


def make_dataset(spec, frames=16, size=32, stride=1, seed=0, **kw):
    """The dataset a spec names: "shapes" -> ShapesDataset, a .csv path -> VideoCSVDataset,
    a folder -> VideoFolderDataset.

    `seed` seeds the shapes world; file datasets draw clip starts from torch's RNG.
    `stride` applies to file datasets; a shape's speed is fixed by the shapes world.
    Other keywords go to the dataset (num_videos, max_shapes, split; video_folder).
    """
    if spec == "shapes":
        return ShapesDataset(size=size, frames=frames, seed=seed, **kw)
    if str(spec).lower().endswith(".csv"):
        return VideoCSVDataset(spec, frames=frames, size=size, stride=stride, **kw)
    if Path(spec).is_dir():
        return VideoFolderDataset(spec, frames=frames, size=size, stride=stride, **kw)
    raise ValueError(f"dataset {spec!r}: want 'shapes', a .csv file (path,caption or videoid,name) "
                     f"or a folder of class folders of videos")

# ------------------------------------------------------------------ the training harness
# Written once, used by ae.py, content.py and motion.py: each stage builds its model and a
# `loss_fn(model, batch) -> loss`, then calls train().

STARTED = time.monotonic()  # --minutes counts from here: each stage imports this module as it starts


def add_training_args(parser, *, steps, batch_size, lr, ema_decay=0.9999, every=500):
    """The flags every stage shares; each stage picks defaults that suit its tiny preset."""
    parser.add_argument("--data", default="shapes", help='"shapes", a CSV of path,caption, or a folder of class folders')
    parser.add_argument("--flops", action="store_true", help="print parameters and FLOPs (on `meta`), then exit")
    parser.add_argument("--out", default=None, help="run directory, one for every stage (default: runs/<preset>)")
    parser.add_argument("--steps", type=int, default=steps, help="total optimizer steps")
    parser.add_argument("--minutes", type=float, default=None,
                        help="also stop, with a checkpoint, once the program has run this long (wall clock from "
                             "its start, so caching counts); the step reached is printed and kept in <stage>.json "
                             "(0: no limit)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help="per process")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--ema-decay", type=float, default=ema_decay,
                        help="weight averaging of the saved model (0: none, the trained weights themselves)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--every", type=int, default=every, help="evaluate and checkpoint every N steps")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--seed", type=int, default=0)


def setup_distributed():
    """-> (rank, world size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a plain
    `python stage.py` is one process. Safe to call again: it joins the process group once."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cpu")
    if use_cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def write_json_atomic(path, obj):
    """Write to a temp file then os.replace: a crash never leaves a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process, as in save_safetensors_atomic
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def save_safetensors_atomic(path, tensors, metadata=None):
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two stages may write the same cache at once
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def load_stage(run_dir, stage, device="cpu"):
    """Read `<run_dir>/<stage>.json` and `<stage>.safetensors` -> (info dict, state_dict)."""
    json_path, weights_path = Path(run_dir) / f"{stage}.json", Path(run_dir) / f"{stage}.safetensors"
    for path in (json_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: train this stage first (python {stage}.py --out {run_dir})")
    with open(json_path) as f:
        info = json.load(f)
    with safe_open(weights_path, "pt", device=str(device)) as f:
        step = int(f.metadata()["step"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    if step != info["step"]:
        raise RuntimeError(f"{run_dir} is half-written ({stage}.json is at step {info['step']}, "
                           f"{stage}.safetensors at step {step}): rerun with --resume to rewrite it")
    return info, state


@torch.no_grad()
def update_ema(ema, model, decay):
    # DiT-style EMA of the weights; sampling uses the EMA copy.
    for ema_p, p in zip(ema.parameters(), model.parameters()):
        ema_p.lerp_(p, 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def save_checkpoint(run_dir, stage, model, ema, opt, step, config, world):
    """Two kinds of files: `<stage>.*` (EMA weights + config: what later stages load) and
    `<stage>-train.*` (raw weights, optimizer, RNG: what --resume needs)."""
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    per_rank = [None] * world
    if world > 1:
        dist.all_gather_object(per_rank, rng)
    else:
        per_rank = [rng]
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    opt_state = opt.state_dict()
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in opt_state["state"].items():
        tensors.update({f"opt.{i}.{k}": v for k, v in state.items()})
    for rank, states in enumerate(per_rank):
        tensors.update({f"rng.{rank}.{j}": s for j, s in enumerate(states)})
    save_safetensors_atomic(run_dir / f"{stage}-train.safetensors", tensors, {"step": str(step)})
    write_json_atomic(run_dir / f"{stage}-train.json", {"step": step, "param_groups": opt_state["param_groups"]})
    save_stage(run_dir, stage, ema, step, config)


def save_stage(run_dir, stage, model, step, config):
    """`<stage>.safetensors` (weights) + `<stage>.json` (config): what load_stage reads back."""
    save_safetensors_atomic(Path(run_dir) / f"{stage}.safetensors", model.state_dict(), {"step": str(step)})
    write_json_atomic(Path(run_dir) / f"{stage}.json", {"stage": stage, "step": step, "config": config})


def load_checkpoint(run_dir, stage, model, ema, opt, rank, world):
    """Restore model, EMA, optimizer and this rank's RNG; returns the step to continue from."""
    info, ema_state = load_stage(run_dir, stage)
    with open(run_dir / f"{stage}-train.json") as f:
        train_info = json.load(f)
    with safe_open(run_dir / f"{stage}-train.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if train_info["step"] != info["step"]:
        raise RuntimeError(f"{run_dir}: {stage}-train.json and {stage}.json disagree on the step; "
                           "the last checkpoint was interrupted, delete the run or its newer files")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    ema.load_state_dict(ema_state)
    opt_state = {"state": {}, "param_groups": train_info["param_groups"]}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            opt_state["state"].setdefault(int(i), {})[name] = value
    opt.load_state_dict(opt_state)
    rng = [tensors[k] for k in sorted(tensors) if k.startswith(f"rng.{rank}.")]
    if rng and world == sum(k.endswith(".0") for k in tensors if k.startswith("rng.")):
        torch.set_rng_state(rng[0])
        if len(rng) > 1 and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng[1])
    else:
        warnings.warn(f"resuming on {world} processes from a checkpoint saved on another count: fresh RNG")
    return info["step"]


def to_device(batch, device):
    return [x.to(device, non_blocking=True) if torch.is_tensor(x) else x for x in batch]


def train(stage, model, loss_fn, dataset, args, config, evaluate=None):
    """Train `model` to minimise `loss_fn(model, batch)` over `dataset`; returns the EMA model.

    One loop for every stage: torchrun DDP, bf16 autocast on GPU, EMA, checkpoints
    (atomic, resumable), metrics as JSON lines in `<out>/metrics.jsonl`.
    `evaluate(ema_model) -> dict` runs on rank 0 every `--every` steps and at the end.
    """
    if args.minutes is not None and args.minutes < 0:
        raise ValueError(f"--minutes must be >= 0 (0: no limit), got {args.minutes}")
    rank, world, device = setup_distributed()
    run_dir = Path(args.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed + rank)  # noise and timesteps differ per rank; weights are synced by DDP
    model.to(device)
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # DiT initialises the EMA as a copy
    # beta2 0.99 (not 0.999): a shorter memory of gradient scale, which helps the short tiny runs.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0)
    step = 0
    if args.resume:
        step = load_checkpoint(run_dir, stage, model, ema, opt, rank, world)
    elif (run_dir / f"{stage}.json").exists():
        raise FileExistsError(f"{run_dir} already holds a {stage} run: pass --resume to continue it, "
                              "or --out to start a new one")
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    batches_per_epoch = len(sampler) // args.batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} videos is smaller than one batch ({args.batch_size} x {world})")
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=args.steps, initial=step, desc=stage, disable=rank != 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    deadline = STARTED + 60 * args.minutes if args.minutes else None
    last_step = args.steps
    while step < last_step:
        # Resume mid-epoch without loading the skipped videos: skip in the index list instead.
        sampler.set_epoch(step // batches_per_epoch)
        indices = list(sampler)[(step % batches_per_epoch) * args.batch_size:]
        # Its own generator, so making a loader does not draw from the global RNG (bit-exact resume).
        seeded = torch.Generator().manual_seed(args.seed + rank + 1000 * (step // batches_per_epoch))
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=indices, drop_last=True, generator=seeded,
                            num_workers=args.num_workers, pin_memory=device.type == "cuda")
        for batch in loader:
            with autocast:
                loss = loss_fn(ddp_model, to_device(batch, device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            # Warm the EMA up: early in a short run a 0.9999 average would still be the random init.
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)
            if deadline is not None and out_of_time(deadline, device, world):
                last_step = step
            if step % 10 == 0 or step in (1, last_step):
                loss = loss.detach()
                if world > 1:
                    dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                if rank == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
                    log_metrics(metrics, stage=stage, step=step, loss=loss.item(), grad_norm=grad_norm.item())
            if step % args.every == 0 or step == last_step:
                if evaluate is not None and rank == 0:
                    log_metrics(metrics, stage=stage, step=step, **evaluate(ema))
                save_checkpoint(run_dir, stage, model, ema, opt, step, config, world)
            if step == last_step:
                break
    bar.close()
    if last_step < args.steps and rank == 0:
        print(f"{stage}: --minutes {args.minutes:g} reached at step {step} of {args.steps}; "
              f"`--resume` continues from there")
    if metrics:
        metrics.close()
    if world > 1:
        # Free DDP while the process group is still registered: if its C++ reducer held the group's
        # last reference, freeing it destroyed gloo's group under the GIL, which could deadlock.
        del ddp_model
        dist.barrier()
        dist.destroy_process_group()
    return ema


def out_of_time(deadline, device, world):
    """Has --minutes run out? Rank 0's clock decides, so every rank stops at the same step."""
    if world == 1:
        return time.monotonic() > deadline
    flag = torch.tensor([float(time.monotonic() > deadline)], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def log_metrics(file, **values):
    file.write(json.dumps(values) + "\n")
    file.flush()


def count_flops(fn):
    """FLOPs of `fn()` as PyTorch's FlopCounterMode counts them (works on the `meta` device)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()

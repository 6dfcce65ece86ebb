"""The library CMD's stages share. The method starts in ae.py; come here when a stage calls in.

  video I/O          read_video (all frames, or one clip), write_video (.mp4, .gif), write_image,
                     video_to_uint8 / uint8_to_video: uint8 (L, H, W, 3) <-> float (L, 3, H, W) in [-1, 1]
  the shapes world   ShapesDataset: coloured shapes that move, with captions (the tiny preset's data)
  video files        VideoCSVDataset (path,caption; WebVid), VideoFolderDataset (UCF-101), make_dataset,
                     listing_captions
  the command line   fail (a one-line error), the training flags, parse_stage_args (a stage's PRESETS row)
  the training loop  train: torchrun DDP, accumulation, lr schedule, EMA, resumable checkpoints, metrics
  the AE's latents   what stages 2 and 3 train on: encode_videos, latent_data, cache_latents, add_latent_args
  FLOPs              count_flops, print_costs (each stage's --flops, and tools/bench.py)

A video size is (height, width) everywhere; datasets yield (video, caption).
"""
import argparse
import contextlib
import copy
import csv
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm


# ----------------------------------------------------------------------------- video I/O

class VideoError(ValueError):
    """A video file that cannot be read; the message names the file."""


def read_video(path, frames=None, stride=1, start=0):
    """Decode a video file -> np.uint8 (L, H, W, 3): all of it, or one clip of `frames` frames taken
    every `stride` frames from frame `start`, equal to all of it [start:start + span:stride] with
    span = (frames - 1) * stride + 1.

    A clip is decoded alone, plus the frames between the keyframe before it and its start: 16
    frames of a 20 s clip, not all 500. start=None draws a start with torch's RNG (seeded per
    DataLoader worker), uniformly over the starts whose span fits.
    """
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            if frames is None:
                decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
            else:
                span = (frames - 1) * stride + 1
                total = stream.frames or _count_frames(path)  # webm and mkv store no frame count
                if total < span:
                    raise VideoError(f"{path} has {total} frames, fewer than the {span} needed")
                if start is None:
                    start = int(torch.randint(total - span + 1, ()))
                decoded = [frame.to_ndarray(format="rgb24")
                           for frame in itertools.islice(_frames_from(container, stream, start), 0, span, stride)]
    except (av.FFmpegError, OSError) as e:
        raise VideoError(f"cannot read video {path}: {e}") from e
    if frames is not None and len(decoded) < frames:  # the container's frame count was too high
        raise VideoError(f"{path}: only {len(decoded)} of {frames} frames decoded from frame {start} "
                         f"(the file says it has {total})")
    if not decoded or any(f.shape != decoded[0].shape for f in decoded):
        raise VideoError(f"{path}: no decodable frames, or frames of changing size")
    return np.stack(decoded)


def _frames_from(container, stream, start):
    """Decoded frames (av.VideoFrame) from frame `start` on, in display order. Frame i is shown at
    pts = pts of frame 0 + i frame durations (near it at a variable frame rate): seek to the keyframe
    before it, then drop the frames decoded before it."""
    decoded = container.decode(stream)
    first = next(decoded, None)
    rate = stream.guessed_rate or stream.average_rate
    if first is None or first.pts is None or not rate or start == 0:  # nothing to seek by, or no need
        yield from itertools.islice(itertools.chain([first] if first else [], decoded), start, None)
        return
    tick = 1 / (rate * stream.time_base)  # one frame's duration, in pts units
    target = first.pts + start * tick  # frame 0's pts, not the stream's start time: AVI B-frames shift it
    seek_to = target
    while True:
        container.seek(int(seek_to), stream=stream, backward=True, any_frame=False)
        decoded = container.decode(stream)
        frame = next(decoded, None)
        if frame is None or frame.pts <= target + tick / 2 or seek_to <= first.pts:
            break
        # Landed past the target: AVI indexes keyframes by decode time, and B-frames shown
        # before their keyframe cannot be decoded from it. Seek again, further back.
        seek_to = max(first.pts, seek_to - (frame.pts - target) - tick)
    while frame is not None and frame.pts < target - tick / 2:
        frame = next(decoded, None)
    if frame is not None:
        yield frame
        yield from decoded


def _count_frames(path):
    """Count a video's frames by reading its packets, without decoding them."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


def write_video(path, frames, fps=8):
    """Write np.uint8 frames (L, H, W, 3) as .mp4 (H.264) or .gif, chosen by the suffix. H.264 in yuv420p
    (what every player accepts) stores colour at half resolution: an odd side is padded by one repeated
    edge row or column. GIF stores 256 colours, here one palette for the whole video (Pillow's median
    cut, no dithering), and delays in 1/100 s (8 fps plays at 8.33 fps)."""
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
            strip = Image.fromarray(frames.reshape(-1, *frames.shape[2:]))  # the frames one below the other
            indexed = strip.quantize(256, dither=Image.Dither.NONE)
            colours = np.array(indexed.getpalette(), np.uint8).reshape(-1, 3)  # up to 256
            palette = np.full((256, 4), 255, np.uint8)  # ARGB rows, opaque
            palette[:len(colours), 1:] = colours
            indices = np.asarray(indexed).reshape(frames.shape[:3])
            images = [av.VideoFrame.from_ndarray((i, palette), format="pal8") for i in indices]
        for image in images:
            container.mux(stream.encode(image))
        container.mux(stream.encode())  # flush the encoder


def write_image(path, image):
    """Write np.uint8 (H, W, 3) as a PNG."""
    Image.fromarray(np.asarray(image)).save(path)


def video_to_uint8(video):
    """float tensor (..., 3, H, W) in [-1, 1] -> np.uint8 (..., H, W, 3)."""
    video = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.movedim(-3, -1).cpu().numpy()


def uint8_to_video(frames):
    """np.uint8 (..., H, W, 3) -> float32 tensor (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


def check_size(size):
    """A video size is (height, width) in pixels: a pair of positive ints. -> (height, width)."""
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ValueError(f"a video size is (height, width), two positive ints, got {size!r}")
    return tuple(size)


def resize_cover(video, size):
    """Float video (L, 3, H, W) -> (L, 3, h, w): scaled to cover (h, w) with its aspect ratio
    kept, then centre-cropped. Nothing is stretched; the excess of one side is cut off."""
    h, w = check_size(size)
    scale = max(h / video.shape[-2], w / video.shape[-1])
    covering = (max(h, round(video.shape[-2] * scale)), max(w, round(video.shape[-1] * scale)))
    video = F.interpolate(video, size=covering, mode="bilinear", antialias=True)  # no aliasing when shrinking
    top, left = (covering[0] - h) // 2, (covering[1] - w) // 2
    return video[..., top:top + h, left:left + w]


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
TRAVEL = 1 / 4    # distance a moving shape covers over the clip
# Radius range by the number of shapes in a video. One shape is drawn large, so that at 32x32 its
# outline (circle, square or triangle) weighs in the loss as much as its colour; two shapes stay
# small enough to pass each other.
RADII = {1: (0.17, 0.21), 2: (0.10, 0.15)}
SCALES = {"growing": (0.7, 1.4), "shrinking": (1.4, 0.7)}  # radius multiplier, first -> last frame
# Angle a rotating shape turns over the clip, upright at its middle: the AE pulls the content frame
# towards the middle frame (ae.middle_frame_loss), so a rotating shape's content frame is the shape as
# every other motion shows it, and the turn is all in the motion latent.
TURN = np.pi / 2
POLYGONS = {"square": (4, 0.8), "triangle": (3, 0.7)}  # (sides, apothem / radius); a circle's radius is 1
EXTENT = 1.4      # farthest reach of any shape from its centre, in radii (the triangle's corners)
MARGIN = 0.05     # free space kept between a shape and the frame's edge
SUPERSAMPLE = 4   # anti-aliasing: draw at 4x4 sub-pixels per pixel, then average


def _trajectory(shape, t):
    """Centre x, y, radius and angle of one shape at clip times t in [0, 1]."""
    dx, dy = DIRECTIONS.get(shape["motion"], (0, 0))
    first, last = SCALES.get(shape["motion"], (1, 1))
    angle = TURN * (t - 0.5) if shape["motion"] == "rotating" else np.zeros_like(t)
    radius = shape["radius"] * (first + (last - first) * t)
    return shape["x"] + TRAVEL * dx * t, shape["y"] + TRAVEL * dy * t, radius, angle


def _overlap(a, b):
    """Do the bounding circles of two shapes ever touch during the clip?"""
    ax, ay, ar, _ = _trajectory(a, np.linspace(0, 1, 33))
    bx, by, br, _ = _trajectory(b, np.linspace(0, 1, 33))
    return bool(np.any(np.hypot(ax - bx, ay - by) < EXTENT * (ar + br)))


def _sample_shape(rng, split, radii):
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
        radius = rng.uniform(*radii)
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
        shapes = [_sample_shape(rng, split, RADII[n]) for _ in range(n)]
        if n == 1 or (shapes[0]["color"] != shapes[1]["color"] and not _overlap(*shapes)):
            return {"background": background, "shapes": shapes}


def caption_for(attributes):
    """'a red circle moving left and a blue square growing on a dark background'."""
    def phrase(s):
        motion = f"moving {s['motion']}" if s["motion"] in DIRECTIONS else s["motion"]  # "growing"
        return f"a {s['color']} {s['shape']} {motion}"
    return " and ".join(phrase(s) for s in attributes["shapes"]) + f" on a {attributes['background']} background"


WORDS = sorted({"a", "and", "moving", "on", "background", *COLORS, *SHAPES, *MOTIONS, *BACKGROUNDS})  # captions


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
    size is the side of the square frames, or (height, width) with height == width.
    """

    def __init__(self, num_videos=10_000, size=32, frames=16, seed=0, max_shapes=1, split="train"):
        if max_shapes not in (1, 2) or split not in ("train", "heldout"):
            raise ValueError(f"want max_shapes 1 or 2 and split 'train' or 'heldout', got {max_shapes}, {split!r}")
        if not isinstance(size, int):
            height, width = check_size(size)
            if height != width:
                raise ValueError(f"the shapes world draws square frames, not {height}x{width}: use e.g. 32x32, "
                                 f"or video files for other shapes")
            size = height
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
VAL_FRACTION = 0.05  # the share of a listing held out for validation when it has no validation listing


class _VideoFileDataset(torch.utils.data.Dataset):
    """Shared by the file datasets: item i is a random clip of listed file i (read_video), resized to
    cover `size` = (height, width) and centre-cropped (resize_cover). Files are opened only when asked
    for (a listing can hold millions). An unreadable or too short file is skipped with a warning and
    counted in `skipped` (per process), and a replacement row drawn, seeded by (seed, index, attempt):
    the same row in every run, and no row gains the weight of bad neighbours."""

    def __init__(self, source, items, frames, size, stride, seed):
        if not items:
            raise ValueError(f"no videos listed in {source}")
        self.source, self.items = source, items  # items: list of (path, caption)
        self.frames, self.size, self.stride, self.seed = frames, check_size(size), stride, seed
        self.bad = set()  # indices of unreadable rows

    @property
    def skipped(self):
        return len(self.bad)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        k = i
        for attempt in itertools.count(1):
            if k not in self.bad:
                path, caption = self.items[k]
                try:
                    return self.load_clip(path), caption
                except VideoError as e:
                    self.bad.add(k)
                    warnings.warn(f"skipping video: {e}")
            if len(self.bad) == len(self.items):
                raise RuntimeError(f"no usable video in {self.source}: all {len(self.items)} failed to decode or "
                                   f"have fewer than {(self.frames - 1) * self.stride + 1} frames; check the "
                                   f"paths, the files and the frames/stride options")
            k = int(np.random.default_rng([self.seed, i, attempt]).integers(len(self.items)))

    def load_clip(self, path):
        clip = uint8_to_video(read_video(path, self.frames, self.stride, start=None))  # a random start
        return resize_cover(clip, self.size).clamp(-1, 1)  # clamp: float rounding of the interpolation


def split_listing(source, items, split, val_fraction, seed):
    """The (path, caption) rows of one split of a listing: "all", "train" or "val". "val" is a fixed
    slice: the distinct paths, sorted, permuted with `seed`, the first `val_fraction` of them (at least
    one of two or more). It depends on the listing and the seed alone (not the order of rows), and rows
    of one video land on one side. "train" is the rest."""
    if split not in ("all", "train", "val") or not 0 <= val_fraction < 1:
        raise ValueError(f"want split 'all', 'train' or 'val' and 0 <= val_fraction < 1, "
                         f"got {split!r}, {val_fraction}")
    if split == "all":
        return items
    paths = sorted({path for path, _ in items})
    n_val = min(len(paths) - 1, max(1, round(val_fraction * len(paths)))) if val_fraction > 0 else 0
    if split == "val" and n_val <= 0:
        raise ValueError(f"{source}: no videos held out for validation ({len(paths)} listed, val_fraction "
                         f"{val_fraction}): list two or more videos, or give a validation listing of its own")
    held_out = {paths[j] for j in np.random.default_rng(seed).permutation(len(paths))[:n_val]}
    return [(path, caption) for path, caption in items if (path in held_out) == (split == "val")]


class VideoCSVDataset(_VideoFileDataset):
    """A CSV with header `path,caption` (paths relative to the CSV's folder), or WebVid's
    `videoid,name`, read as `<video_folder>/<videoid>.mp4` (default: the CSV's folder).
    split, val_fraction and seed choose the rows (split_listing)."""

    def __init__(self, csv_path, frames=16, size=(32, 32), stride=1, video_folder=None, split="all",
                 val_fraction=VAL_FRACTION, seed=0):
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
        items = split_listing(csv_path, items, split, val_fraction, seed)
        super().__init__(csv_path, items, frames, size, stride, seed)


def class_caption(name):
    """'ApplyEyeMakeup' or 'apply_eye_makeup' -> 'apply eye makeup'."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)  # a space before each inner capital
    return " ".join(re.split(r"[\s_-]+", spaced.lower())).strip()


class VideoFolderDataset(_VideoFileDataset):
    """UCF-101 layout: `root/<ClassName>/**/<video>`; the caption is the class name in words. Where
    UCF-101's testlist01.txt lies in root, root/ucfTrainTestlist or ucfTrainTestlist beside root, "val"
    is its official split 1 and "train" trainlist01's videos (or, without that list, the others);
    otherwise the splits are split_listing's."""

    def __init__(self, root, frames=16, size=(32, 32), stride=1, split="all", val_fraction=VAL_FRACTION, seed=0):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"no such video folder: {root}")
        items = [(str(path), class_caption(folder.name))
                 for folder in sorted(root.iterdir()) if folder.is_dir()
                 for path in sorted(folder.rglob("*")) if path.suffix.lower() in VIDEO_SUFFIXES]
        lists = _ucf_lists(root) if split in ("train", "val") else None
        if lists is None:
            items = split_listing(root, items, split, val_fraction, seed)
        else:
            test, train = lists
            names = [Path(path).relative_to(root).as_posix().lower() for path, _ in items]
            keep = [name in test if split == "val" else name in train if train else name not in test for name in names]
            items = [item for item, kept in zip(items, keep) if kept]
        super().__init__(root, items, frames, size, stride, seed)


def _ucf_lists(root):
    """UCF-101's split 1, (testlist01, trainlist01 or None) as sets of 'class/v_class_g01_c01.avi', or None
    where there is no testlist01.txt. Lowercase: copies spell some names differently (HandStandPushups)."""
    def listed(path):
        return {line.split()[0].lower() for line in path.read_text().splitlines() if line.strip()}
    for folder in (root, root / "ucfTrainTestlist", root.parent / "ucfTrainTestlist"):
        if (folder / "testlist01.txt").is_file():
            train = folder / "trainlist01.txt"
            return listed(folder / "testlist01.txt"), listed(train) if train.is_file() else None
    return None


SHAPES_VAL_SEED = 10_000  # the shapes world's "val" split is the world drawn with seed + this


def make_dataset(spec, frames=16, size=(32, 32), stride=1, seed=0, split="train", val_fraction=VAL_FRACTION,
                 val_data=None, **kw):
    """The dataset a spec names, with frames of size = (height, width): "shapes" -> ShapesDataset, a .csv
    -> VideoCSVDataset, a folder -> VideoFolderDataset. Its "train" and "val" splits never share a video:
    the shapes world's "val" is the world drawn with seed + SHAPES_VAL_SEED ("heldout": its unseen
    combinations); a listing's is split_listing's slice, or UCF-101's split 1; with val_data, "val" is
    all of that listing and "train" all of spec. `seed` seeds the shapes, the slice and the replacement
    of unreadable files (clip starts come from torch's RNG). Other keywords go to the dataset."""
    size = check_size(size)
    if val_data is not None:  # a validation listing of its own: each side is used whole
        spec, split = (val_data if split == "val" else spec), "all"
    if spec == "shapes":
        if split == "val":
            seed, split = seed + SHAPES_VAL_SEED, "train"
        return ShapesDataset(size=size, frames=frames, seed=seed, split="train" if split == "all" else split, **kw)
    files = dict(frames=frames, size=size, stride=stride, split=split, val_fraction=val_fraction, seed=seed)
    if str(spec).lower().endswith(".csv"):
        return VideoCSVDataset(spec, **files, **kw)
    if Path(spec).is_dir():
        return VideoFolderDataset(spec, **files, **kw)
    raise ValueError(f"dataset {spec!r}: want 'shapes', a .csv file (path,caption or videoid,name) "
                     f"or a folder of class folders of videos")


def listing_captions(dataset):
    """Every caption of a dataset's listing, without reading a video. The shapes world draws its captions from
    a grammar: its listing's captions are its words (WORDS), each once, "and" of two-shape videos among them."""
    return list(WORDS) if isinstance(dataset, ShapesDataset) else [caption for _, caption in dataset.items]


def report_loading_speed(dataset, n=8):
    """Load n items, print the clips/s (one DataLoader worker's speed: workers x clips/s below batch x
    steps/s means the data bounds training) and return it. torch's RNG is restored: the run is unchanged."""
    n = min(n, len(dataset))
    with torch.random.fork_rng(devices=[]):
        begin = time.perf_counter()
        for i in range(n):
            dataset[i]
        rate = n / (time.perf_counter() - begin)
    print(f"data: {rate:.1f} clips/s decoded and resized by one process (timed on {n} clips)")
    return rate


# ----------------------------------------------------------------------------- the command line

def fail(message):
    """A user's mistake: one line on stderr that names it, exit status 2, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {' '.join(str(message).split())}", file=sys.stderr)
    raise SystemExit(2)


def local_or_name(text):
    """A flag naming a file, a folder or a hub id: an existing local path becomes absolute, so that a
    run records where its inputs are, whatever folder later loads it."""
    return str(Path(text).resolve()) if Path(text).exists() else text


def parse_resolution(text):
    """'512x1024' -> (512, 1024): height x width of the videos, in pixels."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"want HEIGHTxWIDTH in pixels, e.g. 512x1024, got {text!r}") from None
    if height < 1 or width < 1:
        raise argparse.ArgumentTypeError(f"want positive sides, got {text!r}")
    return height, width


def add_training_args(parser):
    """The flags every stage shares. A default here holds unless the --preset's row of the stage's PRESETS
    names the flag (parse_stage_args)."""
    data = parser.add_argument_group("data")
    data.add_argument("--data", help='"shapes", a CSV of path,caption (or WebVid\'s videoid,name), or a folder '
                                     "of class folders (UCF-101)")
    data.add_argument("--resolution", type=parse_resolution, help="HEIGHTxWIDTH of the videos in pixels (stages "
                                                                  "2 and 3 train at their AE's; --flops counts at it)")
    data.add_argument("--val-data", help="a listing to validate on (default: a held-out slice of --data, or "
                                         "UCF-101's testlist01)")
    data.add_argument("--val-fraction", type=float, default=VAL_FRACTION, help="share of --data held out")
    data.add_argument("--stride", type=int, default=1, help="take every stride-th frame of a file")
    data.add_argument("--num-workers", type=int, default=-1,
                      help="DataLoader workers (-1: 8 per GPU; on a CPU 0, and 1 to encode the latent cache)")
    run = parser.add_argument_group("run")
    run.add_argument("--out", help="run directory, one for every stage (default: runs/<preset>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--flops", action="store_true", help="print parameters and FLOPs (on `meta`), then exit")
    run.add_argument("--every", type=int, help="validate and checkpoint every N steps")
    run.add_argument("--minutes", type=float, default=0, help="also stop, with a checkpoint, after this many "
                                                              "minutes of training (0: no limit)")
    optim = parser.add_argument_group("optimisation (AdamW)")
    optim.add_argument("--steps", type=int, help="total optimizer steps")
    optim.add_argument("--batch-size", type=int, help="videos per process and forward pass")
    optim.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimizer step: the "
                                                                 "batch is batch-size x grad-accum x processes")
    optim.add_argument("--lr", type=float, help="peak learning rate")
    optim.add_argument("--warmup", type=int, default=0, help="steps of linear learning-rate warm-up from 0")
    optim.add_argument("--decay", choices=("none", "cosine"), default="none",
                       help="after the warm-up: a constant --lr, or a cosine down to --lr / 10 at --steps")
    optim.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW's beta1 beta2")
    optim.add_argument("--weight-decay", type=float, default=0.0)
    optim.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient norm to this (0: none)")
    optim.add_argument("--ema-decay", type=float, default=0.9999, help="weight averaging of the saved model, "
                                                                       "DiT's 0.9999 (0: none)")
    optim.add_argument("--grad-checkpointing", action="store_true", help="trade compute for memory")
    optim.add_argument("--compile", action="store_true", help="torch.compile the model (on a GPU: the first steps "
                                                              "compile, the rest run faster)")


def parse_stage_args(parser, stage, presets, argv=None):
    """Parse a stage's flags. The --preset's row of the stage's `presets` gives the defaults of the flags it
    names; its other values are the model's, which the stage reads from the row. --help lists each row's flags."""
    flags = {action.dest for action in parser._actions}
    rows = {preset: {k: v for k, v in row.items() if k in flags} for preset, row in presets.items()}
    parser.epilog = "defaults per --preset (the stage's PRESETS, with their sources):\n" + "\n".join(
        f"  {preset}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in row.items())
        for preset, row in rows.items())
    parser.set_defaults(**rows[parser.parse_known_args(argv)[0].preset])
    args = parser.parse_args(argv)
    args.out = args.out or f"runs/{args.preset}"
    if args.data is None and not args.flops:
        fail(f"the {args.preset} preset trains on your videos: pass --data (a CSV of path,caption, or a folder of "
             "class folders)")
    positive = {name: getattr(args, name) for name in ("steps", "batch_size", "grad_accum", "every", "stride")}
    if any(value < 1 for value in positive.values()):
        parser.error(f"these want positive numbers: {positive}")
    if not args.flops:
        try:
            check_run_dir(args.out, stage, args.resume)
        except (FileExistsError, FileNotFoundError) as e:
            fail(e)
    if args.minutes < 0 or not 0 < args.val_fraction < 1:
        parser.error("--minutes wants >= 0 (0: no limit) and --val-fraction a share in (0, 1): every run validates "
                     "(--val-data gives it a listing of its own)")
    return args


def check_run_dir(run_dir, stage, resume):
    """A new run must not overwrite a finished one, and --resume needs a checkpoint to go on from."""
    if not resume and (Path(run_dir) / f"{stage}.json").exists():
        raise FileExistsError(f"{run_dir} already holds this stage's run ({stage}.json): pass --resume to "
                              "continue it, or --out to start a new one")
    if resume and not (Path(run_dir) / f"{stage}-train.pt").exists():
        raise FileNotFoundError(f"--resume, but {run_dir} holds no {stage} checkpoint ({stage}-train.pt) "
                                "to continue from: leave out --resume to start")


def train_and_val_videos(args, frames, size):
    """--data's training videos and its held-out ones (make_dataset's "train" and "val"). A few clips
    are read to report the loading speed, so a listing of unreadable files fails here, not in training."""
    video = dict(frames=frames, size=size, stride=args.stride, seed=args.seed, val_fraction=args.val_fraction,
                 val_data=args.val_data)
    dataset, val_set = (make_dataset(args.data, split=split, **video) for split in ("train", "val"))
    report_loading_speed(dataset)
    return dataset, val_set


def first_items(dataset, n):
    """The first n items of a dataset as one batch: a fixed validation batch."""
    return list(next(iter(DataLoader(dataset, batch_size=min(n, len(dataset))))))


# ----------------------------------------------------------------------------- the training loop
# Written once, used by ae.py, content.py and motion.py: each stage builds its model and a
# `loss_fn(model, batch) -> loss`, then calls train().

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


def learning_rate(step, args):
    """The learning rate of optimizer step `step` (0-based): a linear warm-up to --lr, then --lr,
    or with --decay cosine half a cosine from --lr down to --lr / 10 at --steps (nanoGPT's
    schedule): a short run ends on small steps instead of the noise of a large one."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.decay == "none":
        return args.lr
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def loader_workers(args, device, on_cpu=0):
    """DataLoader workers: --num-workers, or by default 8 per GPU and `on_cpu` on a CPU."""
    return args.num_workers if args.num_workers >= 0 else (8 if device.type == "cuda" else on_cpu)


@torch.no_grad()
def update_ema(ema, model, decay):
    # DiT-style EMA of the weights; sampling uses the EMA copy. One call for all the tensors, not a loop.
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
    for ema_b, b in zip(ema.buffers(), model.buffers()):
        ema_b.copy_(b)


def train(stage, model, loss_fn, dataset, args, config, evaluate=None):
    """Train `model` to minimise `loss_fn(model, batch)` over `dataset`; returns the EMA model.

    One loop for every stage: torchrun DDP, gradient accumulation, bf16 autocast on GPU, the
    learning-rate schedule (learning_rate), EMA, checkpoints (atomic, resumable), metrics as JSON
    lines in `<out>/metrics.jsonl`.
    `evaluate(ema_model) -> dict` runs on rank 0 every `--every` steps and at the end.
    """
    rank, world, device = setup_distributed()
    run_dir = Path(args.out)
    check_run_dir(run_dir, stage, args.resume)
    torch.manual_seed(args.seed + rank)  # noise and timesteps differ per rank; weights are synced by DDP
    model.to(device)
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # DiT initialises the EMA as a copy
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                            fused=True)  # one kernel for all the weights, not a loop over them (CPU and GPU)
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    per_step = args.batch_size * args.grad_accum  # videos one process uses per optimizer step
    steps_per_epoch = len(sampler) // per_step
    if steps_per_epoch == 0:
        fail(f"{stage}: {len(dataset)} training videos are fewer than one optimizer step takes, --batch-size "
             f"{args.batch_size} x --grad-accum {args.grad_accum} x {world} processes: lower --grad-accum or "
             f"--batch-size, or list more videos")
    step = 0
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.resume:
        step = load_checkpoint(run_dir, stage, model, ema, opt, rank, world)
        if rank == 0:
            forget_metrics_after(run_dir / "metrics.jsonl", stage, step)
    ddp_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else model
    forward = torch.compile(ddp_model) if args.compile else ddp_model
    workers = loader_workers(args, device)
    metrics = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    batch = per_step * world
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0,
               desc=f"{stage}, batch {batch} = {args.batch_size} x {args.grad_accum} accumulated x {world} processes")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    deadline = time.monotonic() + 60 * args.minutes if args.minutes else None
    last_step = args.steps
    logged_step, logged_at = step, time.perf_counter()
    while step < last_step:
        # Resume mid-epoch without loading the skipped videos: skip in the index list instead, and
        # end the epoch on a whole step, so that no step mixes two epochs' micro-batches.
        sampler.set_epoch(step // steps_per_epoch)
        indices = list(sampler)[(step % steps_per_epoch) * per_step: steps_per_epoch * per_step]
        # Its own generator, so making a loader does not draw from the global RNG (bit-exact resume).
        seeded = torch.Generator().manual_seed(args.seed + rank + 1000 * (step // steps_per_epoch))
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=indices, drop_last=True, generator=seeded,
                            num_workers=workers, pin_memory=device.type == "cuda")
        step_loss = 0
        for micro, micro_batch in enumerate(loader, start=1):
            syncs = micro % args.grad_accum == 0  # DDP averages gradients across ranks in this backward only
            with ddp_model.no_sync() if world > 1 and not syncs else contextlib.nullcontext():
                with autocast:
                    micro_batch = [x.to(device, non_blocking=True) if torch.is_tensor(x) else x for x in micro_batch]
                    loss = loss_fn(forward, micro_batch) / args.grad_accum
                loss.backward()
            step_loss += loss.detach()
            if not syncs:
                continue
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, args)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"), foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            # Warm the EMA up: early in a short run a 0.9999 average would still be the random init.
            update_ema(ema, model, min(args.ema_decay, (1 + step) / (10 + step)))
            step += 1
            bar.update(1)
            if deadline is not None and out_of_time(deadline, device, world):
                last_step = step
            if step % 10 == 0 or step in (1, last_step):
                if world > 1:
                    dist.all_reduce(step_loss, op=dist.ReduceOp.AVG)
                if rank == 0:  # .item() waits for the GPU: the step time is the time of the steps since the last line
                    bar.set_postfix(loss=f"{step_loss.item():.4f}")
                    log_metrics(metrics, stage=stage, step=step, batch=batch, loss=step_loss.item(),
                                grad_norm=grad_norm.item(), lr=opt.param_groups[0]["lr"],
                                step_seconds=(time.perf_counter() - logged_at) / (step - logged_step))
                logged_step, logged_at = step, time.perf_counter()
            step_loss = 0
            if step % args.every == 0 or step == last_step:
                if evaluate is not None and rank == 0:
                    log_metrics(metrics, stage=stage, step=step, **evaluate(ema))
                save_checkpoint(run_dir, stage, model, ema, opt, step, config, world)
                logged_at = time.perf_counter()  # the step time leaves evaluation and checkpoints out
            if step == last_step:
                break
    bar.close()
    if getattr(dataset, "skipped", 0) and rank == 0:  # file datasets count what they could not read
        print(f"{stage}: skipped {dataset.skipped} unreadable or too short videos of {len(dataset)} (warnings above)")
    if last_step < args.steps and rank == 0:
        print(f"{stage}: --minutes {args.minutes:g} reached at step {step} of {args.steps}; "
              f"`--resume` continues from there")
    if metrics:
        metrics.close()
    if world > 1:
        # Free the DDP wrapper while the process group is still registered, by every name that holds it
        # (`forward` is the same object without --compile). Freed after destroy_process_group, its C++
        # reducer held the group's last reference and destroyed gloo's group with the GIL held, while a
        # gloo thread freeing the barrier's tensors waited for the GIL: a deadlock, now and then.
        del forward, ddp_model
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


def forget_metrics_after(path, stage, step):
    """On --resume: drop the lines `stage` logged after its checkpoint's `step` (a killed run's last
    steps, and a line it was writing when killed), so the resumed run logs each step once."""
    def kept(line):
        try:
            values = json.loads(line)
        except json.JSONDecodeError:
            return False
        return values["stage"] != stage or values["step"] <= step
    if path.is_file():
        lines = [line for line in path.read_text().splitlines(keepends=True) if kept(line)]
        write_atomic(path, lambda tmp: Path(tmp).write_text("".join(lines)))


def held_out_loss(loss_fn, batch, seed=0):
    """An `evaluate` for train(): {"val_loss": loss_fn on a fixed held-out batch}, its noise and timesteps
    drawn from `seed` (the global RNG untouched): the same draw at every evaluation, so the number moves
    only when the model does."""
    @torch.no_grad()
    def evaluate(model):
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            torch.manual_seed(seed)
            return {"val_loss": loss_fn(model, batch).item()}
    return evaluate


# ----------------------------------------------------------------------------- checkpoints

def write_atomic(path, write):
    """write(temp path), then os.replace: a crash never leaves a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"  # per process: two stages may write the same file at once
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path, obj):
    write_atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_safetensors_atomic(path, tensors, metadata=None):
    write_atomic(path, lambda tmp: save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                                             metadata=metadata))


def save_stage(run_dir, stage, model, step, config):
    """`<stage>.safetensors` (weights) + `<stage>.json` (config): what load_stage reads back."""
    save_safetensors_atomic(Path(run_dir) / f"{stage}.safetensors", model.state_dict(), {"step": str(step)})
    write_json_atomic(Path(run_dir) / f"{stage}.json", {"stage": stage, "step": step, "config": config})


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


def save_checkpoint(run_dir, stage, model, ema, opt, step, config, world):
    """Two kinds of files: `<stage>.*` (EMA weights + config: what later stages load) and
    `<stage>-train.pt` (raw weights, optimizer, every rank's RNG: what --resume needs), written first."""
    rng = [torch.get_rng_state()] + ([torch.cuda.get_rng_state()] if torch.cuda.is_available() else [])
    per_rank = [rng]
    if world > 1:
        per_rank = [None] * world
        dist.all_gather_object(per_rank, rng)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    state = {"step": step, "model": model.state_dict(), "opt": opt.state_dict(), "rng": per_rank}
    write_atomic(run_dir / f"{stage}-train.pt", lambda tmp: torch.save(state, tmp))
    save_stage(run_dir, stage, ema, step, config)


def load_checkpoint(run_dir, stage, model, ema, opt, rank, world):
    """Restore model, EMA, optimizer and this rank's RNG; returns the step to continue from."""
    info, ema_state = load_stage(run_dir, stage)
    state = torch.load(run_dir / f"{stage}-train.pt", map_location="cpu", weights_only=True)
    if state["step"] != info["step"]:
        raise RuntimeError(f"{run_dir}: {stage}-train.pt and {stage}.json disagree on the step; "
                           "the last checkpoint was interrupted, delete the run or its newer files")
    model.load_state_dict(state["model"])
    ema.load_state_dict(ema_state)
    opt.load_state_dict(state["opt"])
    if len(state["rng"]) == world:
        torch.set_rng_state(state["rng"][rank][0])
        if len(state["rng"][rank]) > 1 and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["rng"][rank][1])
    else:
        warnings.warn(f"resuming on {world} processes from a checkpoint saved on another count: fresh RNG")
    return info["step"]


# ----------------------------------------------------------------------------- the AE's latents
# Stages 2 and 3 train on what the frozen AE makes of each video, its content frame and motion latent,
# encoded batch by batch on the fly, or read from a cache encoded once.

def add_latent_args(parser):
    """Flags of the stages that train on the AE's latents (content.py, motion.py)."""
    parser.add_argument("--ae", default=None, help="run directory of a trained AE (default: --out)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction,
                        help="encode the dataset with the AE once, keep it as <out>/latents.safetensors (a "
                             "fixed clip per video: for small datasets; WebVid-scale data is encoded on the fly)")
    parser.add_argument("--text", type=lambda name: local_or_name(name) if name.endswith(".json") else name,
                        help='the text encoder: "words", "tiny", an open_clip model name or model-config .json '
                             "(default: the preset's)")
    parser.add_argument("--text-weights", type=local_or_name, help="local open_clip checkpoint of the text encoder")
    parser.add_argument("--snr-gamma", type=lambda text: float(text) or None,
                        help="Min-SNR-gamma loss weights, 0 for the plain loss (default: the preset's)")


def encode_videos(ae, frame_space, batch):
    """A training batch for stages 2 and 3 -> (content_frame, motion_latent, captions).

    The batch is either (videos, captions) from a video dataset, encoded here by the frozen
    AE, or (content_frames, motion_latents, captions) from a cache written by cache_latents."""
    if len(batch) == 3:
        return batch
    videos, captions = batch
    with torch.no_grad():
        content_frame, motion_latent = ae.encode(frame_space.encode(videos))
    return content_frame, motion_latent, captions


@torch.no_grad()
def latent_data(args, ae, frame_space, dataset, val_set, device, val_videos=32):
    """Stage 2 and 3's data: the training videos (or, with --cache, their content frames and motion
    latents) and a fixed batch of the held-out ones, encoded once: (content frames, motion latents,
    captions)."""
    videos, captions = first_items(val_set, val_videos)
    encoded = [ae.encode(frame_space.encode(chunk.to(device))) for chunk in videos.split(args.batch_size)]
    val_batch = [torch.cat([c for c, _ in encoded]), torch.cat([m for _, m in encoded]), list(captions)]
    if not args.cache:
        return dataset, val_batch
    # What the cache was made from: the AE's exact weights and the videos. Another AE or other
    # videos make it stale, and it is encoded again.
    ae_weights = Path(args.ae or args.out) / "ae.safetensors"
    source = {"ae_sha256": hashlib.sha256(ae_weights.read_bytes()).hexdigest(), "data": str(args.data),
              "videos": len(dataset), "seed": args.seed}
    # One worker on a CPU draws (or decodes) the next videos while the AE encodes these.
    return cache_latents(ae, frame_space, dataset, Path(args.out) / "latents.safetensors", device, source,
                         loader_workers(args, device, on_cpu=1)), val_batch


@torch.no_grad()
def cache_latents(ae, frame_space, dataset, path, device, source, workers=0, batch_size=64):
    """Encode every video of `dataset` once and keep the result on disk: stages 2 and 3 then
    train without running the AE (or the SD VAE) again. `source` (a JSON-able dict) says what
    the cache is made from; a cache made from anything else is encoded again. Under torchrun
    rank 0 encodes and the others wait. Returns a dataset of (content_frame, motion_latent, caption)."""
    path, source = Path(path), json.dumps(source, sort_keys=True)
    rank = dist.get_rank() if dist.is_initialized() else 0
    up_to_date = False
    if path.is_file():
        with safe_open(path, "pt") as f:
            up_to_date = f.metadata().get("source") == source
        if not up_to_date and rank == 0:
            print(f"{path} was encoded by another AE or from other videos: encoding it again")
    if rank == 0 and not up_to_date:
        path.parent.mkdir(parents=True, exist_ok=True)
        content, motion, captions = [], [], []
        for videos, texts in tqdm(DataLoader(dataset, batch_size=batch_size, num_workers=workers),
                                  desc=f"caching {path.name}"):
            content_frames, motion_latents = ae.encode(frame_space.encode(videos.to(device)))
            content.append(content_frames.cpu())
            motion.append(motion_latents.cpu())
            captions.extend(texts)
        tensors = {"content_frames": torch.cat(content), "motion_latents": torch.cat(motion)}
        save_safetensors_atomic(path, tensors, {"captions": json.dumps(captions), "source": source})
    if dist.is_initialized():
        dist.barrier()
    with safe_open(path, "pt") as f:
        captions = json.loads(f.metadata()["captions"])
        content, motion = f.get_tensor("content_frames"), f.get_tensor("motion_latents")
    return [(c, m, caption) for c, m, caption in zip(content, motion, captions)]


# ----------------------------------------------------------------------------- FLOPs

def count_flops(fn):
    """(all FLOPs, attention FLOPs) of `fn()`, as PyTorch's FlopCounterMode counts them: 2 per
    multiply-add of matmuls and convolutions; elementwise ops and norms count 0. It works on the
    `meta` device, so full-size models cost no memory. There scaled_dot_product_attention runs in
    its math form, two batched matmuls (QK^T, then PV), and no layer of our models uses bmm
    otherwise: the bmm share is the attention's."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0)


def print_costs(name, model, loss, what):
    """--flops: `model`'s parameters and the FLOPs of one training step, loss().backward() (about three
    forwards), for `what` (the batch and its shapes). The caller builds both on the `meta` device."""
    params = sum(p.numel() for p in model.parameters())
    flops, _ = count_flops(lambda: loss().backward())
    print(f"{name}: {params / 1e6:.1f} M parameters, {flops / 1e12:.3f} TFLOPs per training step ({what})")
    return params, flops

"""Tests of CMD, one section per file in reading order: data, ae, content, motion, sample, tools.
CPU only, a few minutes in all:

    OMP_NUM_THREADS=1 python -m pytest -q test_cmd.py
    OMP_NUM_THREADS=1 python -m pytest -q -s test_cmd.py   # also print the models' sizes and FLOPs

The kinds of test: parity with a reference we did not write (DDIM against diffusers, attention
against softmax(QK^T)V, text features against open_clip, FLOPs against hand counts), smoke
runs of tiny models, save -> load round trips, and failure tests (bad input, the promised error).
"""
import argparse
import gc
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import av
import lpips
import numpy as np
import open_clip
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

import ae
import content
import data
import motion
import sample
from content import (SD21_UNET_CONFIG, TINY_TEXT_CONFIG, Diffusion, TextEncoder, build_text_encoder,
                     build_unet, cfg_output, drop_prompts, load_open_clip_text_weights, load_sd_unet,
                     load_text_encoder, save_text_encoder, scratch_unet, unet_model_fn)
from motion import MotionConfig, MotionDiT, example_inputs
from tools import bench as bench_tool
from tools import curves, evaluate, paper_check, shapes
from tools.bench import (PAPER_SETUP, SYSTEMS, bench, build, random_text_encoder, sample_video, sampling_flops,
                         training_flops)


# ==================================================================================================
# Fixtures and helpers the sections share
# ==================================================================================================

def write_clip(path, frames=8, height=24, width=32, green=None):
    """A small video: left quarter red, right quarter blue, a green middle whose
    brightness is `green[l]` in frame l (default: constant)."""
    video = np.zeros((frames, height, width, 3), np.uint8)
    video[:, :, : width // 4] = (200, 30, 30)
    video[:, :, -(width // 4):] = (30, 30, 200)
    levels = np.full(frames, 160) if green is None else np.asarray(green)
    video[:, :, width // 4: -(width // 4), 1] = levels[:, None, None]
    data.write_video(path, video)
    return video


MICRO = replace(ae.preset_config("tiny", (16, 16)), frames=4, hidden=32, heads=2, encoder_depth=1, decoder_depth=1,
                motion_dim=4)


TINY_UNET = content.PRESETS["tiny"]["unet"]  # the tiny preset's UNet from scratch


def micro_dataset(n=16):
    return data.ShapesDataset(num_videos=n, size=16, frames=4)


def training_args(out, **overrides):
    parser = argparse.ArgumentParser()
    data.add_training_args(parser)
    parser.set_defaults(steps=4, batch_size=4, grad_accum=1, lr=1e-3, warmup=0, betas=(0.9, 0.99), weight_decay=0.0,
                        grad_clip=1.0, ema_decay=0.9999, every=2)
    args = parser.parse_args([])
    args.out = str(out)
    vars(args).update(overrides)
    return args


def ae_loss(model, batch):
    return ae.training_loss(model, batch[0])


def train_micro(out, videos=16, **overrides):
    torch.manual_seed(0)
    model = ae.Autoencoder(MICRO)
    args = training_args(out, **overrides)
    return model, data.train("ae", model, ae_loss, micro_dataset(videos), args, vars(MICRO))


def run_stage_one_step(stage, out):
    """`python <stage>.py` for one training step of batch 2 into the run `out`."""
    flags = ["--no-cache"] if stage in (content, motion) else []
    sys.argv = [f"{stage.__name__}.py", "--steps", "1", "--batch-size", "2", "--out", str(out), *flags]
    stage.main()


def fails_with(argv, capsys, *words, stage=sample):
    """`python <stage>.py argv` gives one line on stderr naming the problem and exit status 2."""
    with pytest.raises(SystemExit) as e:
        stage.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1 and "error" in err, err
    for word in words:
        assert word in err, err


def sd_scheduler(prediction_type="epsilon", set_alpha_to_one=False, **kw):
    """diffusers' DDIM with Stable Diffusion's settings: the reference we did not write."""
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                         beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=set_alpha_to_one,
                         clip_sample=False, timestep_spacing="leading", prediction_type=prediction_type, **kw)


@pytest.fixture(scope="module")
def tiny_te():
    return build_text_encoder("tiny")


def make_run(run_dir, ae_config=ae.preset_config("tiny")):
    """Freshly initialised tiny stages, built and saved the way ae.py, content.py and motion.py do."""
    torch.manual_seed(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    data.save_stage(run_dir, "ae", ae.Autoencoder(ae_config), 0, asdict(ae_config))
    te = content.build_text_encoder("tiny")
    content.save_text_encoder(te, run_dir)
    c = ae_config
    unet = content.scratch_unet(TINY_UNET, te.width, (c.height, c.width), c.channels)
    schedule = {"prediction_type": "v_prediction"}
    data.save_stage(run_dir, "content", unet, 0, {"content": asdict(content.content_config("tiny")), "unet": dict(unet.config),
                                             "schedule": schedule, "text_weights": None})
    dit = motion.MotionDiT(motion.config_for("tiny", None, ae_config, (te.width, te.embed_dim)))
    data.save_stage(run_dir, "motion", dit, 0, {"model": asdict(dit.config), "schedule": schedule})
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("run"))


class StandInI3D(nn.Module):
    """Saved as StyleGAN-V's i3d_torchscript.pt is (TorchScript) with its call signature. Its features:
    8 random projections of the input, then what it was given (GIVEN)."""

    def __init__(self):
        super().__init__()
        self.project = nn.Linear(24, 8)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        uint8 = float(x.dtype == torch.uint8)
        x = x.float()  # (N, 3, T, H, W)
        features = self.project(F.adaptive_avg_pool3d(x, (2, 2, 2)).flatten(1))
        given = torch.tensor([float(x.shape[2]), float(x.shape[3]), float(x.shape[4]), float(x.min()), float(x.max()),
                              uint8, float(rescale), float(resize), float(return_features)])
        return torch.cat([features, given.expand(x.shape[0], 9)], 1)


GIVEN = {name: 8 + k for k, name in enumerate(("T", "H", "W", "min", "max", "uint8", "rescale", "resize",
                                                 "return_features"))}  # what StandInI3D saw, by column


def given(features, *names):
    return [features[0, GIVEN[name]] for name in names]


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(StandInI3D()), str(path))
    return path


def random_videos(n, frames=16, height=24, width=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, frames, height, width, 3), dtype=np.uint8)


def write_videos(folder, videos):
    folder.mkdir(parents=True, exist_ok=True)
    for i, video in enumerate(videos):
        data.write_video(folder / f"{i:03d}.mp4", video)
    return folder


def last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def write_with_pyav(path, frames, codec, pix_fmt="yuv420p"):
    """np.uint8 (L, H, W, 3) -> a file in any container PyAV writes (avi: mpeg4, webm: vp8)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A stand-in for torchvision's vgg16-397923af.pth (its `features.*` weights, random), for LPIPS."""
    torch.manual_seed(0)
    backbone = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).net.state_dict()  # "slice3.10.bias", ...
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{name.split('.', 1)[1]}": value for name, value in backbone.items()}, path)
    return path


# A user's own clips, as they come: five codecs in five containers, sizes of any shape, free captions with
# punctuation, quotes and non-ASCII words. (file, codec (None: a GIF by data.write_video), pixel format,
# (height, width), caption)
USER_CLIPS = [
    ("colour bars.mp4", "libx264", "yuv420p", (48, 64), 'TV color bars, "broadcast" test; static'),
    ("rgb.gif", None, None, (40, 40), "rgb test source as a gif"),
    ("café.webm", "libvpx-vp9", "yuv420p", (36, 64), "Café au lait: a cup, steaming (VP9)"),
    ("motion jpeg.avi", "mjpeg", "yuvj420p", (64, 200), "a 64x200 clip in motion JPEG, 日本語 too"),
    ("mpeg4.avi", "mpeg4", "yuv420p", (48, 48), "a blob drifting right!"),
    ("h264.mkv", "libx264", "yuv420p", (32, 48), "the same blob... drifting left"),
]


def user_clips(folder, frames=20):
    """USER_CLIPS written into `folder` (a blob of its own colour drifting across a gradient) and listed in
    folder/clips.csv as path,caption. -> the CSV's path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, codec, pix_fmt, (height, width), _ in USER_CLIPS:
        ys, xs = np.mgrid[:height, :width] / max(height, width)
        colour, start, step = rng.uniform(0, 255, 3), rng.uniform(0.2, 0.5, 2), rng.uniform(-0.02, 0.02, 2)
        video = np.empty((frames, height, width, 3))
        for i in range(frames):
            blob = np.exp(-((ys - start[0] - i * step[0]) ** 2 + (xs - start[1] - i * step[1]) ** 2) / 0.02)[..., None]
            video[i] = (1 - blob) * 255 * ys[..., None] + blob * colour
        video = video.round().astype(np.uint8)
        data.write_video(folder / name, video) if codec is None else write_with_pyav(folder / name, video, codec, pix_fmt)
    return paper_check.write_csv(folder / "clips.csv", [(name, caption) for name, *_, caption in USER_CLIPS])


UCF_CLASSES = ("ApplyEyeMakeup", "Biking", "JumpRope")


@pytest.fixture(scope="module")
def ucf_folder(tmp_path_factory):
    """UCF-101 as it unpacks, in small: class folders of 320x240 .avi files (a blob of the class's colour
    drifting), and ucfTrainTestlist/ beside them: group 1 of each class in testlist01, 2 and 3 in trainlist01."""
    root = tmp_path_factory.mktemp("ucf") / "UCF-101"
    ys, xs = np.mgrid[:240, :320] / 320
    for k, name in enumerate(UCF_CLASSES):
        (root / name).mkdir(parents=True)
        for group in (1, 2, 3):
            frames = np.empty((20, 240, 320, 3), np.uint8)
            for i in range(20):
                blob = np.exp(-((ys - 0.2 - 0.02 * i) ** 2 + (xs - 0.3 - 0.01 * group) ** 2) / 0.01)[..., None]
                frames[i] = (80 * (1 - blob) + blob * np.eye(3)[k] * 255).round()
            write_with_pyav(root / name / f"v_{name}_g{group:02d}_c01.avi", frames, "mpeg4")
    lists = root.parent / "ucfTrainTestlist"
    lists.mkdir()
    for name, groups in (("testlist01.txt", (1,)), ("trainlist01.txt", (2, 3))):
        (lists / name).write_text("".join(f"{c}/v_{c}_g{g:02d}_c01.avi\r\n" for c in UCF_CLASSES for g in groups))
    return root


# ==================================================================================================
# data.py: the shapes world, video I/O, file datasets, the training loop, FLOPs
# ==================================================================================================

# --- the shapes world --------------------------------------------------------------------------------

def test_shapes_deterministic_per_index_and_seed():
    a, b, c = data.ShapesDataset(seed=0), data.ShapesDataset(seed=0), data.ShapesDataset(seed=1)
    for i in range(4):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
    assert any(not torch.equal(a[i][0], c[i][0]) for i in range(4))
    assert not torch.equal(a[0][0], a[1][0])


def test_shapes_caption_attributes_and_pixels_agree():
    dataset = data.ShapesDataset(num_videos=24, size=32, frames=16, max_shapes=2)
    counts = set()
    for i in range(len(dataset)):
        video, caption = dataset[i]
        attributes = dataset.attributes(i)
        counts.add(len(attributes["shapes"]))
        assert caption == data.caption_for(attributes)
        assert video.shape == (16, 3, 32, 32) and video.dtype == torch.float32
        assert video.min() >= -1 and video.max() <= 1
        frames = data.video_to_uint8(video)
        background = data.render_shapes({"background": attributes["background"], "shapes": []}, 32, 16)
        named = {s["color"] for s in attributes["shapes"]}
        for color, rgb in data.COLORS.items():
            exact = (frames == np.array(rgb)).all(-1).sum((1, 2))  # pixels of exactly this colour, per frame
            assert (exact >= 3).all() if color in named else (exact == 0).all(), (caption, color)
        # shapes stay inside the frame: the outermost pixels are always background
        border = np.ones((32, 32), bool)
        border[1:-1, 1:-1] = False
        assert np.array_equal(frames[:, border], background[:, border]), caption
    assert counts == {1, 2}


@pytest.mark.parametrize("motion", data.MOTIONS)
def test_shapes_move_as_captioned(motion):
    square = {"color": "red", "shape": "square", "motion": motion, "x": 0.5, "y": 0.5, "radius": 0.12}
    attributes = {"background": "dark", "shapes": [square]}
    video = data.render_shapes(attributes, size=48, frames=16)
    dark, red = np.array(data.BACKGROUNDS["dark"][0]), np.array(data.COLORS["red"])
    alpha = np.abs(video - dark).sum(-1) / np.abs(red - dark).sum()  # (L, H, W): how much of a pixel is red
    area = alpha.sum((1, 2))
    ys, xs = np.mgrid[0:48, 0:48]
    centre = np.stack([(alpha * xs).sum((1, 2)), (alpha * ys).sum((1, 2))], -1) / area[:, None]
    shift = centre[-1] - centre[0]
    if motion in data.DIRECTIONS:  # a clearly visible distance: a quarter of the frame
        assert np.allclose(shift, np.array(data.DIRECTIONS[motion]) * 48 / 4, atol=1)
    else:
        assert np.abs(shift).max() < 0.5
        ratio = area[-1] / area[0]
        assert {"growing": ratio > 3, "shrinking": ratio < 1 / 3, "rotating": 0.95 < ratio < 1.05}[motion]
    if motion == "rotating":  # a quarter turn, upright halfway through: the square starts and ends a diamond
        assert np.abs(video[0].astype(int) - video[-1]).max() < 3 and np.abs(video[0].astype(int) - video[8]).max() > 100


def test_heldout_split_never_or_only_heldout_combos():
    train = data.ShapesDataset(num_videos=400, max_shapes=2, split="train")
    heldout = data.ShapesDataset(num_videos=100, split="heldout")
    combos = lambda a: {(s["color"], s["shape"], s["motion"]) for s in a["shapes"]}
    assert all(not combos(train.attributes(i)) & set(data.HELDOUT_COMBOS) for i in range(len(train)))
    drawn = set()
    for i in range(len(heldout)):
        attributes = heldout.attributes(i)
        assert len(attributes["shapes"]) == 1 and combos(attributes) <= set(data.HELDOUT_COMBOS)
        drawn |= combos(attributes)
    assert drawn == set(data.HELDOUT_COMBOS)
    video, caption = heldout[0]
    assert video.shape == (16, 3, 32, 32) and caption == data.caption_for(heldout.attributes(0))


# --- video I/O ---------------------------------------------------------------------------------------

def test_uint8_video_round_trip_is_exact():
    frames = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    video = data.uint8_to_video(frames)
    assert video.shape == (2, 3, 4, 5) and video.min() >= -1 and video.max() <= 1
    assert np.array_equal(data.video_to_uint8(video), frames)


@pytest.mark.parametrize("suffix, tolerance", [(".mp4", 4.0), (".gif", 2.0)])
def test_write_read_round_trip(tmp_path, suffix, tolerance):
    dataset = data.ShapesDataset(max_shapes=2)
    frames = np.concatenate([data.render_shapes(dataset.attributes(i), 32, 12) for i in range(2)], axis=2)
    data.write_video(tmp_path / f"clip{suffix}", frames)
    back = data.read_video(tmp_path / f"clip{suffix}")
    assert back.shape == frames.shape and back.dtype == np.uint8
    assert np.abs(back.astype(float) - frames).mean() < tolerance  # mp4 and gif are lossy


def test_mp4_pads_odd_sizes(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (3, 15, 17, 3), dtype=np.uint8)
    data.write_video(tmp_path / "odd.mp4", frames)
    assert data.read_video(tmp_path / "odd.mp4").shape == (3, 16, 18, 3)


def test_unreadable_video_raises_video_error_naming_it(tmp_path):
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"this is not a video" * 50)
    for path in (bad, tmp_path / "missing.mp4"):
        for read in (data.read_video, lambda path: data.read_video(path, frames=4)):
            with pytest.raises(data.VideoError, match=path.name):
                read(path)
    write_clip(tmp_path / "short.mp4", frames=3)
    with pytest.raises(data.VideoError, match="short.mp4 has 3 frames, fewer than the 4"):
        data.read_video(tmp_path / "short.mp4", frames=2, stride=3)
    with pytest.raises(ValueError, match="uint8"):
        data.write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8, 3), np.float32))


def write_coded(path, codec, height, width, frames=30, b_frames=0):
    """Frames that all differ, a keyframe every 6 frames (so a clip is read by seeking), written
    through PyAV: write_video writes only mp4 and gif."""
    import av
    y, x = np.mgrid[:height, :width]
    video = np.stack([np.stack([(4 * x + 9 * i) % 256, (3 * y + 5 * i) % 256, np.full_like(x, 8 * i)], -1)
                      for i in range(frames)]).astype(np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        stream.codec_context.gop_size, stream.codec_context.max_b_frames = 6, b_frames
        for frame in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("name, codec, height, width, b_frames", [
    ("h264.mp4", "libx264", 96, 160, 2), ("mpeg4.avi", "mpeg4", 120, 90, 2),
    ("vp9.webm", "libvpx-vp9", 72, 200, 0), ("vp8.webm", "libvpx", 72, 200, 0)])
def test_clip_reader_equals_full_decoding(tmp_path, name, codec, height, width, b_frames):
    # B-frames: an AVI seek can land on a keyframe shown after the start; webm stores no frame count
    write_coded(tmp_path / name, codec, height, width, b_frames=b_frames)
    full = data.read_video(tmp_path / name)
    assert len(full) == 30
    for frames, stride in ((4, 1), (4, 3)):
        span = (frames - 1) * stride + 1
        for start in (0, 1, 5, 6, 7, 13, 30 - span):
            clip = data.read_video(tmp_path / name, frames, stride, start)
            assert np.array_equal(clip, full[start:start + span:stride]), (frames, stride, start)
    torch.manual_seed(0)
    start = int(torch.randint(30 - 10 + 1, ()))
    torch.manual_seed(0)
    assert np.array_equal(data.read_video(tmp_path / name, 4, 3, start=None), full[start:start + 10:3])  # torch's RNG
    with pytest.raises(data.VideoError, match=f"{name} has 30 frames, fewer than the 31"):
        data.read_video(tmp_path / name, 31)


@pytest.mark.parametrize("source", [(96, 160), (120, 90), (72, 200)])
@pytest.mark.parametrize("target", [(32, 64), (64, 32)])
def test_resize_cover_crops_without_stretching(source, target):
    height, width = source
    side = round(0.4 * min(source))
    video = -torch.ones(2, 3, height, width)
    top, left = (height - side) // 2, (width - side) // 2
    video[..., top:top + side, left:left + side] = 1  # a centred square
    out = data.resize_cover(video, target)
    assert out.shape == (2, 3, *target)
    rows, cols = (out[0, 0] > 0).nonzero(as_tuple=True)
    box = (rows.max() - rows.min() + 1).item(), (cols.max() - cols.min() + 1).item()
    scale = max(target[0] / height, target[1] / width)  # cover: the side that fits decides
    assert abs(box[0] - box[1]) <= 1 and abs(box[0] - side * scale) <= 1.5  # still a square, not stretched


# --- file datasets -----------------------------------------------------------------------------------

def test_folder_dataset_skips_and_counts_bad_videos(tmp_path):
    (tmp_path / "ApplyEyeMakeup").mkdir()
    (tmp_path / "jump_rope").mkdir()
    write_clip(tmp_path / "ApplyEyeMakeup" / "good.mp4")
    write_clip(tmp_path / "jump_rope" / "good.gif")
    write_clip(tmp_path / "jump_rope" / "short.mp4", frames=3)
    (tmp_path / "jump_rope" / "corrupt.mp4").write_bytes(b"\x00garbage" * 100)
    (tmp_path / "jump_rope" / "notes.txt").write_text("not a video")
    dataset = data.VideoFolderDataset(tmp_path, frames=6, size=(16, 16))
    assert len(dataset) == 4
    with pytest.warns(UserWarning) as caught:
        items = [dataset[i] for i in range(len(dataset))]
    assert dataset.skipped == 2
    messages = " ".join(str(w.message) for w in caught)
    assert "corrupt.mp4" in messages and "short.mp4" in messages
    assert {caption for _, caption in items} == {"apply eye makeup", "jump rope"}
    assert all(video.shape == (6, 3, 16, 16) and video.abs().max() <= 1 for video, _ in items)


def test_all_bad_folder_raises_naming_the_folder(tmp_path):
    root = tmp_path / "broken_videos"
    (root / "Kayaking").mkdir(parents=True)
    (root / "Kayaking" / "a.mp4").write_bytes(b"nope")
    dataset = data.VideoFolderDataset(root)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="broken_videos"):
        dataset[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.VideoFolderDataset(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.VideoFolderDataset(tmp_path / "nowhere")


def test_csv_dataset_both_column_styles(tmp_path):
    (tmp_path / "clips").mkdir()
    write_clip(tmp_path / "clips" / "1001.mp4")
    (tmp_path / "ours.csv").write_text('path,caption\nclips/1001.mp4,"a dog, running"\nclips/missing.mp4,gone\n')
    dataset = data.VideoCSVDataset(tmp_path / "ours.csv", frames=4, size=(8, 8))
    with pytest.warns(UserWarning, match="missing.mp4"):
        captions = [dataset[i][1] for i in range(2)]
    assert captions == ["a dog, running"] * 2 and dataset.skipped == 1

    (tmp_path / "webvid.csv").write_text("videoid,contentUrl,name\n1001,http://x,a cat on a sofa\n")
    dataset = data.VideoCSVDataset(tmp_path / "webvid.csv", frames=4, size=(8, 12), video_folder=tmp_path / "clips")
    video, caption = dataset[0]
    assert video.shape == (4, 3, 8, 12) and caption == "a cat on a sofa"

    (tmp_path / "empty.csv").write_text("path,caption\n")
    with pytest.raises(ValueError, match="empty.csv"):
        data.VideoCSVDataset(tmp_path / "empty.csv")
    (tmp_path / "odd.csv").write_text("file,text\na.mp4,hi\n")
    with pytest.raises(ValueError, match="videoid,name"):
        data.VideoCSVDataset(tmp_path / "odd.csv")


def test_resize_crop_and_temporal_stride(tmp_path):
    (tmp_path / "Surfing").mkdir()
    write_clip(tmp_path / "Surfing" / "v.mp4", frames=12, height=24, width=48, green=40 + 15 * np.arange(12))
    dataset = data.VideoFolderDataset(tmp_path, frames=4, size=(16, 16), stride=3)
    torch.manual_seed(0)
    video, caption = dataset[0]
    torch.manual_seed(0)
    assert torch.equal(video, dataset[0][0])  # the temporal crop follows torch's RNG
    assert video.shape == (4, 3, 16, 16) and caption == "surfing"
    # shorter side 24 -> 16 makes the frame 16 x 32; the centre crop is the green middle half
    assert (video[:, 0, :, 2:-2] < -0.6).all() and (video[:, 2, :, 2:-2] < -0.6).all()
    step = (video[:, 1].mean((1, 2)).diff() * 127.5).numpy()  # green rises 15 per frame, 45 per 3 frames
    assert np.allclose(step, 45, atol=4)


def test_make_dataset_dispatch(tmp_path):
    shapes = data.make_dataset("shapes", frames=8, size=(16, 16), seed=3, num_videos=5, max_shapes=2)
    assert isinstance(shapes, data.ShapesDataset) and len(shapes) == 5 and shapes[0][0].shape == (8, 3, 16, 16)
    for size in (16, "16x16", (16,), (16, 0), (16.0, 16)):  # a size is (height, width), nothing else
        with pytest.raises(ValueError, match=r"\(height, width\)"):
            data.make_dataset("shapes", size=size)
    with pytest.raises(ValueError, match="square.*32x32"):
        data.make_dataset("shapes", size=(16, 32))
    (tmp_path / "Biking").mkdir()
    write_clip(tmp_path / "Biking" / "v.mp4")
    (tmp_path / "list.csv").write_text("path,caption\nBiking/v.mp4,a bike\n")
    assert isinstance(data.make_dataset(str(tmp_path / "list.csv"), frames=4), data.VideoCSVDataset)
    assert isinstance(data.make_dataset(tmp_path, frames=4, stride=2), data.VideoFolderDataset)
    with pytest.raises(ValueError, match="'shapes', a .csv file"):
        data.make_dataset("ucf101")


def test_bad_rows_are_replaced_at_random(tmp_path):
    write_clip(tmp_path / "good.mp4")
    rows = [f"good.mp4,clip {k}" for k in range(6)] + [f"gone{k}.mp4,bad {k}" for k in range(5)]
    (tmp_path / "list.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")

    def serve():
        dataset = data.VideoCSVDataset(tmp_path / "list.csv", frames=4, size=(8, 8))
        with pytest.warns(UserWarning, match="gone"):
            return dataset, [dataset[i][1] for i in range(11)]

    dataset, captions = serve()
    assert captions[:6] == [f"clip {k}" for k in range(6)] and dataset.skipped == 5
    # Taking the next row (wrapping around) served clip 0 six times in eleven, all five replacements.
    assert captions.count("clip 0") < 6 and len(set(captions[6:])) > 1
    assert serve()[1] == captions  # seeded: the same replacements in every run


def test_val_split_is_fixed_and_disjoint_from_train(tmp_path):
    rows = [f"v{k:02d}.mp4,video {k}" for k in range(40)] + ["v00.mp4,video 0 again"]
    (tmp_path / "list.csv").write_text("path,caption\n" + "\n".join(rows) + "\n")
    (tmp_path / "reversed.csv").write_text("path,caption\n" + "\n".join(rows[::-1]) + "\n")

    def paths(spec="list.csv", **kw):  # the videos a split lists (files are only opened when served)
        return {Path(p).name for p, _ in data.make_dataset(str(tmp_path / spec), **kw).items}

    train, val = paths(split="train"), paths(split="val")
    assert len(val) == 2 and not train & val and len(train | val) == 40  # 5% of 40, never trained on
    assert paths(split="val") == val == paths("reversed.csv", split="val")  # fixed, whatever the row order
    assert paths(split="val", seed=1) != val and len(paths(split="val", val_fraction=0.25)) == 10
    assert paths(split="train", val_fraction=0) == train | val
    with pytest.raises(ValueError, match="no videos held out"):
        paths(split="val", val_fraction=0)
    # a validation listing of its own: each side is used whole
    (tmp_path / "val.csv").write_text("path,caption\nw0.mp4,a\nw1.mp4,b\n")
    assert paths(split="val", val_data=str(tmp_path / "val.csv")) == {"w0.mp4", "w1.mp4"}
    assert paths(split="train", val_data=str(tmp_path / "val.csv")) == train | val
    # the shapes world: "val" is the world drawn with another seed; "heldout" still works
    shapes_val = data.make_dataset("shapes", split="val", seed=3, num_videos=4)
    assert [shapes_val.attributes(i) for i in range(4)] == [data.ShapesDataset(seed=10_003).attributes(i)
                                                            for i in range(4)]
    assert data.make_dataset("shapes", split="heldout", num_videos=4).split == "heldout"


def test_ucf_testlist01_is_the_val_split(tmp_path):
    root = tmp_path / "UCF-101"
    for name in ("ApplyEyeMakeup", "Biking"):
        (root / name).mkdir(parents=True)
        for group in (1, 2, 8, 9):
            (root / name / f"v_{name}_g{group:02d}_c01.avi").touch()  # listed, not opened
    lists = tmp_path / "ucfTrainTestlist"  # beside the class folders' root, as UCF-101 unpacks
    lists.mkdir()
    (lists / "testlist01.txt").write_text("".join(f"{name}/v_{name}_g0{group}_c01.avi\r\n"
                                                  for name in ("ApplyEyeMakeup", "Biking") for group in (1, 2)))
    (lists / "trainlist01.txt").write_text("".join(f"{name}/v_{name}_g0{group}_c01.avi {label}\r\n"
                                                   for label, name in enumerate(("ApplyEyeMakeup", "Biking"), 1)
                                                   for group in (8, 9)))

    def groups(split):
        return sorted(Path(p).stem[-7:-4] for p, _ in data.make_dataset(root, split=split).items)

    (root / "Biking" / "v_Biking_g05_c01.avi").touch()  # in neither list
    assert groups("val") == ["g01", "g01", "g02", "g02"] and groups("train") == ["g08", "g08", "g09", "g09"]
    (lists / "trainlist01.txt").unlink()  # the test list alone: every other video trains
    assert groups("val") == ["g01", "g01", "g02", "g02"] and groups("train") == ["g05", "g08", "g08", "g09", "g09"]
    (lists / "testlist01.txt").unlink()  # no official split: a seeded slice of 5%, at least one video
    assert len(groups("val")) == 1 and len(groups("train")) == 8


def test_report_loading_speed_leaves_the_run_unchanged(tmp_path, capsys):
    write_clip(tmp_path / "v.mp4", frames=12)
    (tmp_path / "list.csv").write_text("path,caption\nv.mp4,a clip\n")
    dataset = data.make_dataset(str(tmp_path / "list.csv"), frames=4)
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert data.report_loading_speed(dataset, n=3) > 0 and "clips/s" in capsys.readouterr().out
    assert torch.equal(torch.rand(3), expected)  # clip starts drew from a forked RNG


# --- the training loop -------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_a_tenth_by_cosine():
    args = argparse.Namespace(lr=1e-3, warmup=10, steps=110, decay="cosine")
    lrs = [data.learning_rate(step, args) for step in range(args.steps)]
    assert lrs[:10] == pytest.approx([1e-4 * k for k in range(1, 11)])  # linear warm-up to --lr
    assert lrs[10] == pytest.approx(1e-3) and lrs[60] == pytest.approx(0.55e-3)  # half way: half way down
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    args.decay = "none"
    assert [data.learning_rate(step, args) for step in range(10, 110)] == [1e-3] * 100


def test_short_training_run_loss_drops(tmp_path):
    train_micro(tmp_path, videos=4, steps=200, every=200)  # one batch, seen 200 times
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [line["loss"] for line in lines if "loss" in line]
    assert all(line["stage"] == "ae" for line in lines) and lines[-1]["step"] == 200
    assert losses[-1] < 0.5 * losses[0]


def test_time_limit_stops_with_a_checkpoint_that_resumes_exactly(tmp_path, capsys):
    straight, _ = train_micro(tmp_path / "straight", steps=4)
    train_micro(tmp_path / "limited", steps=4, minutes=1e-9)  # out of time after the first step
    assert torch.load(tmp_path / "limited" / "ae-train.pt")["step"] == 1
    assert "reached at step 1 of 4" in capsys.readouterr().out
    resumed, _ = train_micro(tmp_path / "limited", steps=4, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_continues_exactly(tmp_path):
    straight, _ = train_micro(tmp_path / "straight", steps=4)
    train_micro(tmp_path / "resumed", steps=2)
    with pytest.raises(FileExistsError, match="--resume"):
        train_micro(tmp_path / "resumed", steps=4)
    resumed, _ = train_micro(tmp_path / "resumed", steps=4, resume=True)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    a, b = (torch.load(tmp_path / run / "ae-train.pt") for run in ("straight", "resumed"))
    assert a["step"] == b["step"] == 4 and a["opt"]["state"].keys() == b["opt"]["state"].keys()
    assert all(torch.equal(a["opt"]["state"][i][k], b["opt"]["state"][i][k]) for i in a["opt"]["state"]
               for k in ("exp_avg", "exp_avg_sq"))


def test_accumulating_two_half_batches_is_one_whole_batch(tmp_path):
    whole, _ = train_micro(tmp_path / "whole", steps=3, batch_size=4, grad_accum=1)
    halves, _ = train_micro(tmp_path / "halves", steps=3, batch_size=2, grad_accum=2)
    for (name, a), b in zip(whole.state_dict().items(), halves.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    logged = [json.loads(line) for line in open(tmp_path / "halves" / "metrics.jsonl")]
    assert logged[-1]["step"] == 3 and logged[-1]["batch"] == 4  # the effective batch


def test_missing_and_half_written_runs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="train this stage first"):
        ae.load_ae(tmp_path / "nothing-here")
    train_micro(tmp_path, steps=2)
    info = json.load(open(tmp_path / "ae.json"))
    info["step"] = 7
    json.dump(info, open(tmp_path / "ae.json", "w"))
    with pytest.raises(RuntimeError, match="half-written"):
        ae.load_ae(tmp_path)


def killed_worker(out):
    """Trains 50 steps, checkpointing every 15, and is killed -9 in step 42: after its metrics line for
    step 40, and after its last checkpoint, at step 30."""
    calls = []

    def loss_then_kill(model, batch):
        calls.append(1)
        if len(calls) == 42:
            os.kill(os.getpid(), signal.SIGKILL)
        return ae_loss(model, batch)

    torch.manual_seed(0)
    data.train("ae", ae.Autoencoder(MICRO), loss_then_kill, micro_dataset(), training_args(out, steps=50, every=15),
               vars(MICRO))


def test_resume_after_a_kill_logs_each_step_once(tmp_path):
    process = mp.get_context("spawn").Process(target=killed_worker, args=(tmp_path,))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "ae", "st')  # and a line cut short by the kill
    train_micro(tmp_path, steps=50, every=15, resume=True)
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == [1, 10, 20, 30, 40, 50]  # step 40 was logged by the killed run, then by the resumed one


def test_a_listing_smaller_than_one_optimizer_step_is_a_one_line_error(tmp_path, capsys):
    for k in range(3):
        write_clip(tmp_path / f"v{k}.mp4", frames=16, height=32, width=32)
    listing = paper_check.write_csv(tmp_path / "three.csv", [(f"v{k}.mp4", f"clip {k}") for k in range(3)])
    fails_with(["--data", str(listing), "--grad-accum", "32", "--out", str(tmp_path / "run")], capsys,
               "2 training videos", "--batch-size 8 x --grad-accum 32", stage=ae)
    assert not (tmp_path / "run").exists()


def join_as_gloo_rank(rank, port):
    """The environment torchrun gives rank `rank` of two on one machine; setup_distributed reads it."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def count_ddp_alive_at_teardown(log):
    """From now on, each dist.destroy_process_group first appends to `log` how many DDP wrappers are alive.
    One still alive then is freed later, its reducer destroying the gloo group with the GIL held: the
    hang that data.train's teardown prevents, now and then only, so the tests check its cause."""
    destroy = dist.destroy_process_group

    def counted(*args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{sum(isinstance(o, DDP) for o in gc.get_objects())}\n")
        return destroy(*args, **kwargs)
    dist.destroy_process_group = counted


def ddp_worker(rank, out, port, minutes=(0, 0)):
    join_as_gloo_rank(rank, port)
    count_ddp_alive_at_teardown(out / f"ddp-alive-{rank}")
    model, _ = train_micro(out / "run", steps=2, batch_size=2, minutes=minutes[rank])
    torch.save(model.state_dict(), out / f"rank{rank}.pt")


def free_port():
    with socket.socket() as s:  # a port nothing else holds
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker, *args):
    """Run worker(rank, *args) in two processes; a hung process group fails the test instead of CI."""
    workers = mp.spawn(worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 120
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the two gloo processes did not finish within 2 minutes")


@pytest.mark.parametrize("minutes", [(0, 0), (1e-9, 1e6)])
def test_two_gloo_processes_end_with_identical_weights(tmp_path, minutes):
    """Also under --minutes, where rank 0 runs out of time at once and rank 1 would go on:
    rank 0's clock decides, so both stop after the first step."""
    spawn_two(ddp_worker, tmp_path, free_port(), minutes)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    initial = ae.Autoencoder(MICRO).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # and they did train
    assert json.load(open(tmp_path / "run" / "ae.json"))["step"] == (2 if minutes[0] == 0 else 1)
    assert [(tmp_path / f"ddp-alive-{r}").read_text() for r in (0, 1)] == ["0\n", "0\n"]


# --- FLOPs -------------------------------------------------------------------------------------------

def on_meta(*shape, grad=False):
    return torch.empty(*shape, device="meta", requires_grad=grad)


def test_linear_flops_match_hand_count():
    # y = x W^T + b: one multiply-add (2 FLOPs) per (row, input, output); the bias add is not counted.
    batch, tokens, d_in, d_out = 3, 5, 8, 16
    layer = nn.Linear(d_in, d_out, device="meta")
    assert data.count_flops(lambda: layer(on_meta(batch, d_in))) == (2 * batch * d_in * d_out, 0)
    assert data.count_flops(lambda: layer(on_meta(batch, tokens, d_in))) == (2 * batch * tokens * d_in * d_out, 0)


def test_attention_flops_match_hand_count():
    # softmax(Q K^T / sqrt(d)) V: Q K^T is (N x d)(d x N), P V is (N x N)(N x d), each N*N*d
    # multiply-adds per (batch, head): 4 B H N^2 d FLOPs in all, and all of it is attention.
    b, h, n, d = 2, 3, 10, 8
    q = on_meta(b, h, n, d)
    attention = lambda: F.scaled_dot_product_attention(q, q, q)
    assert data.count_flops(attention) == (4 * b * h * n * n * d,) * 2
    # ... and a linear layer is none of it, even on (b, n, d) tokens
    assert data.count_flops(lambda: nn.Linear(d, d, device="meta")(on_meta(b, n, d)))[1] == 0


def test_attention_backward_is_twice_the_forward():
    # the basis of "a training step ~ 3 forwards": dQ, dK, dV, dP are four more matmuls of the same size
    b, h, n, d = 1, 2, 6, 4
    q = on_meta(b, h, n, d, grad=True)
    forward, _ = data.count_flops(lambda: F.scaled_dot_product_attention(q, q, q))
    assert data.count_flops(lambda: F.scaled_dot_product_attention(q, q, q).sum().backward())[0] == 3 * forward


# ==================================================================================================
# ae.py: the autoencoder (content frame + motion latent)
# ==================================================================================================

def test_content_weights_sum_to_one_and_static_video_gives_its_frame():
    torch.manual_seed(0)
    model = ae.Autoencoder(ae.preset_config("tiny"))
    frame = torch.rand(2, 3, 32, 32) * 2 - 1
    static = frame[:, None].expand(2, 16, 3, 32, 32)
    content_frame, _ = model.encode(static)
    torch.testing.assert_close(content_frame, frame, atol=1e-5, rtol=0)
    h = model.enc_norm(model.encoder[0](model.enc_patch(model.patchify(static)) + model.pos_space))
    weights = model.unpatchify(model.to_weight_logits(h)).softmax(dim=1)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(2, 3, 32, 32))


def test_middle_frame_weight_makes_the_content_frame_the_middle_frame(tmp_path):
    """The tiny preset's pull (ae.middle_frame_loss): trained with it, a moving shape's content frame
    is the clip's middle frame; trained on reconstruction alone, a blend of the frames."""
    videos = torch.stack([micro_dataset(4)[i][0] for i in range(4)])

    def distance_after_training(weight):
        def loss(model, batch):
            return ae.training_loss(model, batch[0], weight)

        torch.manual_seed(0)
        args = training_args(tmp_path / str(weight), steps=100, every=100, ema_decay=0.0)
        trained = data.train("ae", ae.Autoencoder(MICRO), loss, micro_dataset(4), args, vars(MICRO))
        return ae.middle_frame_loss(trained.encode(videos)[0], videos).item()

    pulled, free = distance_after_training(1.0), distance_after_training(0.0)
    assert pulled < 0.2 * free


def test_tiny_encode_decode_shapes():
    model = ae.Autoencoder(ae.preset_config("tiny"))
    video = torch.rand(2, 16, 3, 32, 32) * 2 - 1
    content_frame, motion_latent = model.encode(video)
    assert content_frame.shape == (2, 3, 32, 32)
    assert motion_latent.shape == (2, 16, 8 + 8, 8)  # L x (H' + W') x D
    assert motion_latent.abs().max() <= 1
    assert model.decode(content_frame, motion_latent).shape == video.shape
    with pytest.raises(ValueError, match="expected frames of shape"):
        model.encode(video[:, :8])


def test_paper_preset_on_meta_shapes_params_and_flops():
    config = ae.preset_config("paper")
    with torch.device("meta"):
        model = ae.Autoencoder(config)
        content_frame, motion_latent = model.encode(torch.empty(1, 16, 4, 64, 128))
        assert model.decode(content_frame, motion_latent).shape == (1, 16, 4, 64, 128)
    assert content_frame.shape == (1, 4, 64, 128)
    assert motion_latent.shape == (1, 16, 32 + 64, 8)  # the paper's 8 x 16 x 96 motion latent
    params, flops = data.print_costs("AE", *ae.training_step(config), "batch 1, 512x1024")
    assert 47.3e6 < params < 47.5e6  # the release's AE, GEGLU and all
    assert 8e12 < flops < 16e12  # a training step at 512x1024, batch 1


def test_geglu_ae_is_the_releases_size_and_the_papers_table_8():
    """The paper preset's AE with the release's GEGLU: 47.4 M parameters, and 0.77 T multiply-adds a
    forward at 16 x 512 x 512 without the attention matmuls (the paper's convention, Table 8); 0.62 with GELU."""
    at_512 = replace(ae.preset_config("paper"), width=64)
    for feed_forward, tmacs, params in (("geglu", 0.773, 47.4e6), ("gelu", 0.619, 37.9e6)):
        model, loss = ae.training_step(replace(at_512, feed_forward=feed_forward))
        flops, attention = data.count_flops(loss)
        assert (flops - attention) / 2e12 == pytest.approx(tmacs, abs=0.001), feed_forward
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.002), feed_forward
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(ae.GEGLU()(x), x[..., :4] * F.gelu(x[..., 4:]))


def test_ucf_ae_is_the_releases_but_for_the_differences_the_readme_names():
    """The ucf preset's AE has the README's 47,361,064 parameters: the release's 47,359,510, plus a
    LayerNorm after the encoder and after the decoder (1,536), and one bias per element in the content-weight
    and output heads where the release's ConvTranspose2d has one per channel (9 + 9)."""
    with torch.device("meta"):
        model = ae.Autoencoder(ae.preset_config("ucf"))
    params = sum(p.numel() for p in model.parameters())
    norms = sum(p.numel() for norm in (model.enc_norm, model.dec_norm) for p in norm.parameters())
    biases = sum(head.bias.numel() - model.config.channels for head in (model.to_weight_logits, model.to_pixels))
    assert (params, norms, biases, params - norms - biases) == (47_361_064, 1_536, 18, 47_359_510)
    readme = " ".join((Path(__file__).parent / "README.md").read_text().split())
    assert "47,361,064 parameters and the release's 47,359,510" in readme


def test_release_pixel_loss_is_4_l1_and_4_lpips_of_one_random_frame(vgg_file, tmp_path):
    perceptual = ae.load_lpips(vgg_file)
    weights = torch.load(vgg_file)
    assert torch.equal(perceptual.net.state_dict()["slice3.10.weight"], weights["features.10.weight"])  # its VGG16
    assert not any(p.requires_grad for p in perceptual.parameters())  # frozen, outside the optimizer
    torch.manual_seed(0)
    frames, reconstruction = torch.rand(2, 2, 16, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    value = ae.release_pixel_loss(perceptual)(reconstruction, frames)
    torch.manual_seed(1)
    picked = torch.randint(16, (2,))  # one frame a clip
    rows = torch.arange(2)
    expected = 4 * (reconstruction - frames).abs().mean() + 4 * perceptual(reconstruction[rows, picked],
                                                                           frames[rows, picked]).mean()
    torch.testing.assert_close(value, expected)
    assert ae.release_pixel_loss(None)(reconstruction, frames) == 4 * (reconstruction - frames).abs().mean()
    (tmp_path / "not-vgg.pth").write_bytes(b"garbage")
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    for bad in ("not-vgg.pth", "other.pth"):
        with pytest.raises(ValueError, match="holds no torchvision VGG16"):
            ae.load_lpips(tmp_path / bad)


def test_save_load_identical_outputs(tmp_path):
    _, ema = train_micro(tmp_path, steps=2)
    loaded, frame_space = ae.load_ae(tmp_path)
    video = micro_dataset()[0][0][None]
    assert frame_space.encode(video) is video  # the tiny preset works on pixels
    assert torch.equal(loaded(video)[0], ema(video)[0])


# ==================================================================================================
# content.py: diffusion maths and DDIM, the text encoder, the UNet, the latents of stages 2 and 3
# ==================================================================================================

# --- diffusion maths ---------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [10, 25, 50])
def test_ddim_timesteps_match_diffusers(steps):
    ref = sd_scheduler()
    ref.set_timesteps(steps)
    assert Diffusion().ddim_timesteps(steps) == ref.timesteps.tolist()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_steps_match_diffusers(prediction_type, eta, steps):
    ref, ours = sd_scheduler(prediction_type), Diffusion(prediction_type=prediction_type)
    ref.set_timesteps(steps)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 4, 8, 8, generator=g)
    for t in ours.ddim_timesteps(steps):
        x_t, model_output, noise = torch.randn(3, 2, 4, 8, 8, generator=g)  # same inputs for both
        # one step, from a unit-scale x_t
        torch.testing.assert_close(ours.ddim_step(model_output, t, x_t, steps, eta, noise),
                                   ref.step(model_output, t, x_t, eta=eta,
                                            variance_noise=noise).prev_sample,
                                   atol=1e-5, rtol=0)
        # the whole chain (random model outputs push |x| to ~50, so compare relatively)
        x_ref = ref.step(model_output, t, x_ref, eta=eta, variance_noise=noise).prev_sample
        x_ours = ours.ddim_step(model_output, t, x_ours, steps, eta, noise)
        torch.testing.assert_close(x_ours, x_ref, atol=1e-5, rtol=1e-5)


def test_schedule_and_targets_match_diffusers():
    ref, ours = sd_scheduler("v_prediction"), Diffusion(prediction_type="v_prediction")
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    x0, noise = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    t = torch.tensor([0, 1, 500, 998, 999])
    torch.testing.assert_close(ours.q_sample(x0, t, noise), ref.add_noise(x0, noise, t),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.training_target(x0, noise, t), ref.get_velocity(x0, noise, t),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("set_alpha_to_one", [False, True])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_zero_terminal_snr_schedule_matches_diffusers(eta, set_alpha_to_one):
    """Lin et al.'s rescaled schedule: alpha_0 kept, alpha_T exactly 0 (x_T is pure noise), and
    every DDIM step as diffusers takes it, the last one to alpha_0 or (scratch models) to 1."""
    ref = sd_scheduler("v_prediction", set_alpha_to_one, rescale_betas_zero_snr=True)
    ours = Diffusion(prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=set_alpha_to_one)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod[0], Diffusion().alphas_cumprod[0])
    assert ours.alphas_cumprod[-1] == 0 and Diffusion().alphas_cumprod[-1] > 0.004
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours.q_sample(x0, torch.tensor([999, 999]), noise), noise)
    ref.set_timesteps(25)
    g = torch.Generator().manual_seed(0)
    for t in ours.ddim_timesteps(25):
        x_t, model_output, noise = torch.randn(3, 2, 4, 8, 8, generator=g)
        torch.testing.assert_close(ours.ddim_step(model_output, t, x_t, 25, eta, noise),
                                   ref.step(model_output, t, x_t, eta=eta, variance_noise=noise).prev_sample,
                                   atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs v_prediction"):
        Diffusion(prediction_type="epsilon", rescale_betas_zero_snr=True)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_targets_round_trip(prediction_type):
    d = Diffusion(prediction_type=prediction_type)
    # any shape (here motion-latent-like tokens); float64 so the algebra, not rounding, is tested
    x0, noise = torch.randn(4, 16, 6, dtype=torch.float64), torch.randn(4, 16, 6, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    x0_hat, eps_hat = d.predict_x0_eps(d.training_target(x0, noise, t), x_t, t)
    torch.testing.assert_close(eps_hat, noise, atol=1e-9, rtol=0)
    torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_zero_for_an_oracle(prediction_type):
    d = Diffusion(prediction_type=prediction_type)
    x0 = torch.randn(8, 3, 4, 4)

    def oracle(x_t, t, cond):  # knows x_0 (passed as cond), so it can compute the exact target
        a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x_t - a.sqrt() * cond) / (1 - a).sqrt()
        return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * cond

    assert d.loss(oracle, x0, x0).item() < 1e-8
    assert d.loss(lambda x, t, c: torch.zeros_like(x), x0, x0).item() > 0.1


def test_min_snr_weights_match_the_formula_of_hang_et_al():
    """Min-SNR-gamma: per-sample weight min(SNR, gamma) / (SNR + 1) on the v target (written out
    here from the paper's formula), and min(SNR, gamma) / SNR on eps, which is 1 with no cap."""
    x0 = torch.randn(16, 3, 4, 4)
    zeros = lambda x, t, c: torch.zeros_like(x)  # noqa: E731  a model that predicts 0: error = target^2
    v = Diffusion(prediction_type="v_prediction")
    torch.manual_seed(0)
    weighted = v.loss(zeros, x0, None, snr_gamma=5.0)
    torch.manual_seed(0)  # the same t and noise again
    t = torch.randint(0, 1000, (16,))
    noise = torch.randn_like(x0)
    a = v.alphas_cumprod[t]
    snr = a / (1 - a)
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1)
    per_sample = v.training_target(x0, noise, t).square().mean((1, 2, 3))
    torch.testing.assert_close(weighted, (weight * per_sample).mean())
    assert not torch.allclose(weighted, per_sample.mean())  # the weights do something
    eps = Diffusion(prediction_type="epsilon")
    torch.manual_seed(1)
    uncapped = eps.loss(zeros, x0, None, snr_gamma=float("inf"))
    torch.manual_seed(1)
    torch.testing.assert_close(uncapped, eps.loss(zeros, x0, None))


def test_cfg_scale_one_and_batched_equals_separate(tiny_te):
    torch.manual_seed(0)
    unet = scratch_unet(TINY_UNET, tiny_te.width, sample_size=8).eval()
    model_fn = unet_model_fn(unet)
    cond, _ = tiny_te(["a red circle", "a blue square"])
    uncond, _ = tiny_te(["", ""])
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    with torch.no_grad():
        out_cond, out_uncond = model_fn(x, t, cond), model_fn(x, t, uncond)
        torch.testing.assert_close(cfg_output(model_fn, x, t, cond, uncond, 1.0), out_cond,
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(cfg_output(model_fn, x, t, cond, uncond, 4.0),
                                   out_uncond + 4.0 * (out_cond - out_uncond), atol=1e-5, rtol=0)


def test_ddim_sample_tuple_condition_is_seeded():
    d = Diffusion(prediction_type="v_prediction")
    seen = []

    def model_fn(x, t, cond):  # motion-style condition: a tuple of tensors
        tokens, pooled = cond
        seen.append((x.shape[0], tokens.shape[0], pooled.shape[0]))
        return 0.1 * x + pooled[:, :1, None]

    cond = (torch.randn(3, 77, 8), torch.randn(3, 8))
    uncond = (torch.zeros(3, 77, 8), torch.zeros(3, 8))

    def run():
        g = torch.Generator().manual_seed(1)
        return d.ddim_sample(model_fn, (3, 16, 4), cond, uncond, steps=2, cfg_scale=3.0, eta=1.0,
                             generator=g, progress=False)

    a, b = run(), run()
    assert a.shape == (3, 16, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b)
    assert seen[0] == (6, 6, 6)  # cond and uncond in one batched forward
    d.ddim_sample(model_fn, (3, 16, 4), cond, uncond, steps=2, cfg_scale=1.0, progress=False)
    assert seen[-1] == (3, 3, 3)  # guidance off: the unconditional half is skipped


def test_drop_prompts_drops_its_share_at_random():
    prompts = [f"prompt {i}" for i in range(20_000)]
    torch.manual_seed(0)
    dropped = drop_prompts(prompts)  # the default share, 10%, that both diffusion stages train with
    assert abs(dropped.count("") / len(prompts) - 0.1) < 0.01  # binomial: one standard deviation is 0.002
    assert all(d in ("", p) for d, p in zip(dropped, prompts))
    assert drop_prompts(prompts, 0.3, torch.Generator().manual_seed(1)) != drop_prompts(prompts, 0.3)
    assert drop_prompts(prompts[:4], 0.0) == prompts[:4] and drop_prompts(prompts[:4], 1.0) == [""] * 4


# --- text encoder ------------------------------------------------------------------------------------

def test_text_features_shape_and_deterministic(tiny_te):
    tokens, pooled = tiny_te(["a red circle moves left", ""])
    assert tokens.shape == (2, TINY_TEXT_CONFIG["text_cfg"]["context_length"], TINY_TEXT_CONFIG["text_cfg"]["width"])
    assert pooled.shape == (2, TINY_TEXT_CONFIG["embed_dim"])
    tokens2, pooled2 = build_text_encoder("tiny")(["a red circle moves left", ""])
    assert torch.equal(tokens, tokens2) and torch.equal(pooled, pooled2)
    assert not torch.equal(tokens[0], tokens[1])


def test_text_features_match_open_clip(tiny_te):
    """Penultimate tokens and pooled embedding agree with open_clip's own forward passes."""
    prompts = ["a green triangle bounces", "", "two squares"]
    tokens, pooled = tiny_te(prompts)
    ids = open_clip.tokenize(prompts, context_length=tiny_te.text.context_length)
    with torch.no_grad():
        torch.testing.assert_close(pooled, tiny_te.text(ids))
        out = tiny_te.text.forward_intermediates(ids, indices=[-2], normalize_intermediates=True,
                                                   output_fmt="NLC")
    torch.testing.assert_close(tokens, out["text_intermediates"][0])


def test_long_prompt_warns_and_bad_prompts_fail(tiny_te):
    with pytest.warns(UserWarning, match="truncated to 24"):
        tokens, _ = tiny_te(["word " * 100])
    assert tokens.shape[1] == 24
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_te(["word " * 22])  # 24 tokens fit: no warning
    with pytest.raises(TypeError, match="list of str"):
        tiny_te("a bare string")
    with pytest.raises(TypeError, match="list of str"):
        tiny_te(["ok", None])
    with pytest.raises(ValueError, match="blank prompt"):
        tiny_te(["   "])


def test_tiny_text_encoder_save_load(tmp_path, tiny_te):
    save_text_encoder(tiny_te, tmp_path)
    loaded = load_text_encoder(tmp_path)
    prompts = ["a yellow star spins", ""]
    for a, b in zip(tiny_te(prompts), loaded(prompts)):
        assert torch.equal(a, b)
    with pytest.raises(FileNotFoundError, match="no saved text encoder"):
        load_text_encoder(tmp_path / "missing")


def test_text_weights_from_full_open_clip_checkpoint(tmp_path):
    """A CLIP checkpoint (vision + text, like ViT-H-14's) fills the text tower; features match CLIP's."""
    torch.manual_seed(0)
    clip = open_clip.CLIP(embed_dim=TINY_TEXT_CONFIG["embed_dim"], text_cfg=TINY_TEXT_CONFIG["text_cfg"],
                          vision_cfg=dict(image_size=16, patch_size=8, width=32, layers=1,
                                          head_width=16)).eval()
    torch.save({"state_dict": clip.state_dict()}, tmp_path / "clip.pt")
    te = load_open_clip_text_weights(TextEncoder(TINY_TEXT_CONFIG), tmp_path / "clip.pt")
    prompts = ["a purple circle", ""]
    ids = open_clip.tokenize(prompts, context_length=te.text.context_length)
    with torch.no_grad():
        torch.testing.assert_close(te(prompts)[1], clip.encode_text(ids))
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no open_clip text tower"):
        load_open_clip_text_weights(TextEncoder(TINY_TEXT_CONFIG), tmp_path / "bad.pt")


def test_vit_h14_text_tower_on_meta():
    with torch.device("meta"):
        te = TextEncoder(open_clip.get_model_config("ViT-H-14"))
    assert te.width == 1024 and te.embed_dim == 1024
    tokens, pooled = te(["an astronaut dances in the desert", ""])
    assert tokens.shape == (2, 77, 1024) and tokens.is_meta and pooled.shape == (2, 1024)
    assert 350e6 < sum(p.numel() for p in te.parameters()) < 360e6


# --- UNet --------------------------------------------------------------------------------------------

def test_sd_folder_loads_offline(tmp_path):
    torch.manual_seed(0)
    unet = scratch_unet(TINY_UNET, 64, sample_size=8).eval()
    unet.save_pretrained(tmp_path / "unet")
    sd_scheduler("v_prediction", rescale_betas_zero_snr=True).save_pretrained(tmp_path / "scheduler")
    loaded, schedule = load_sd_unet(str(tmp_path))
    assert schedule == dict(prediction_type="v_prediction", num_train_timesteps=1000,
                            beta_start=0.00085, beta_end=0.012, steps_offset=1, rescale_betas_zero_snr=True,
                            set_alpha_to_one=False)  # SD's: the last step stops at alpha_0
    x, t, tokens = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, 64)
    with torch.no_grad():
        # equal weights; on one thread the two copies' outputs differ in the last bits
        torch.testing.assert_close(unet_model_fn(unet)(x, t, tokens), unet_model_fn(loaded.eval())(x, t, tokens),
                                   atol=1e-5, rtol=0)
    assert Diffusion(**schedule).ddim_timesteps(2) == [501, 1]


def test_tiny_unet_hears_the_prompt_without_cross_attention():
    # the pooled-prompt path (added to the timestep embedding) alone makes the output prompt-dependent
    torch.manual_seed(0)
    te, unet = build_text_encoder("tiny"), scratch_unet(TINY_UNET, 64, sample_size=8).eval()
    model_fn = unet_model_fn(unet)
    x, t, tokens = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1), torch.tensor([500, 500]), te(["a red", "a blue"])[0]
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".attn2.to_out" in name:  # silence every cross-attention
                p.zero_()
        out = model_fn(x, t, tokens)
        assert not torch.allclose(out[0], out[1], atol=1e-4)
        unet.add_embedding.norm2.weight.zero_()  # silence the pooled prompt too:
        unet.add_embedding.norm2.bias.zero_()
        out = model_fn(x, t, tokens)
        assert torch.allclose(out[0], out[1], atol=1e-6)  # nothing else carried it


def test_sd_folder_without_unet_fails(tmp_path):
    sd_scheduler().save_pretrained(tmp_path / "scheduler")
    with pytest.raises(FileNotFoundError, match="lacks unet/config.json"):
        load_sd_unet(str(tmp_path))


def test_build_unet(tmp_path):
    te = build_text_encoder("tiny")
    unet, schedule = build_unet(content.content_config("tiny"), (3, 8, 8), te.width)
    assert unet.config.cross_attention_dim == te.width and Diffusion(**schedule).prediction_type == "v_prediction"
    tokens, _ = te(["a red circle"])
    assert unet_model_fn(unet)(torch.randn(1, 3, 8, 8), torch.tensor([5]), tokens).shape == (1, 3, 8, 8)
    # an SD folder: the schedule comes from its scheduler config; the frame space must match
    scratch_unet(TINY_UNET, te.width, sample_size=8).save_pretrained(tmp_path / "unet")
    sd_scheduler("epsilon").save_pretrained(tmp_path / "scheduler")
    config = content.content_config("tiny", sd=str(tmp_path))
    assert build_unet(config, (3, 8, 8), te.width)[1]["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="takes 3-channel frames"):
        build_unet(config, (4, 8, 8), te.width)
    DDIMScheduler(beta_schedule="linear").save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="scaled_linear"):
        load_sd_unet(str(tmp_path))


def test_bag_of_words_is_one_hot_over_words_or_classes(tmp_path):
    te = content.BagOfWords({"words": data.WORDS})
    tokens, pooled = te(["a red circle moving left on a dark background", ""])
    assert tokens.shape == (2, 1, len(data.WORDS)) and torch.equal(tokens[:, 0], pooled)
    words = [data.WORDS[k] for k in pooled[0].nonzero()[:, 0]]
    assert sorted(words) == ["a", "background", "circle", "dark", "left", "moving", "on", "red"]
    assert pooled[0].max() == 1 and pooled[1].abs().sum() == 0  # the words present, once; "" is no word
    with pytest.raises(ValueError, match="unknown word 'dog'.*a, and"):
        te(["a dog"])
    save_text_encoder(te, tmp_path / "words")
    assert load_text_encoder(tmp_path / "words").config == te.config
    te = content.BagOfWords({"classes": ["apply eye makeup", "biking"]})
    tokens, pooled = te(["ApplyEyeMakeup", "biking", "", "apply eye makeup"])  # a folder's name, or in words
    assert torch.equal(pooled, torch.eye(2)[[0, 1, 0, 0]] * torch.tensor([1, 1, 0, 1])[:, None])  # "": zeros
    assert torch.equal(tokens, pooled[:, None])
    with pytest.raises(ValueError, match="unknown class 'surfing'.*apply eye makeup, biking"):
        te(["Surfing"])
    save_text_encoder(te, tmp_path)
    assert load_text_encoder(tmp_path).config == te.config and not (tmp_path / "text_encoder.safetensors").exists()


def test_bag_of_words_vocabulary_is_the_listings_words():
    """Any captions: lower-cased, punctuation split off and dropped, the most frequent kept (ties
    alphabetically), sorted; the shapes world's listing gives exactly its 24 words in their order."""
    captions = ['TV color bars, "broadcast" test; static', "rgb test source as a GIF", "Café au lait: tést!"]
    assert content.caption_words(captions[0]) == ["tv", "color", "bars", "broadcast", "test", "static"]
    assert content.word_vocabulary(captions) == (sorted({"tv", "color", "bars", "broadcast", "test", "static", "rgb",
                                                         "source", "as", "a", "gif", "café", "au", "lait", "tést"}), 0)
    assert content.word_vocabulary(captions, limit=3) == (["a", "as", "test"], 12)  # "test" twice, then a, as
    assert content.word_vocabulary(data.listing_captions(data.ShapesDataset()))[0] == data.WORDS
    with pytest.raises(ValueError, match="no words"):
        content.word_vocabulary(["", "?!"])
    te = content.BagOfWords({"words": content.word_vocabulary(captions)[0]})
    assert list(te.buffers())[0].numel() == 0  # no V x V one-hot table
    pooled = te(['tv COLOR bars; "broadcast"...'])[1][0]
    assert [te.config["words"][k] for k in pooled.nonzero()[:, 0]] == ["bars", "broadcast", "color", "tv"]


def test_unknown_words_fail_at_sampling_and_are_skipped_in_training():
    """A word the run never saw is a ValueError that names it (sample.py: one line, exit 2); training skips
    the words the vocabulary's cap dropped. A class is never skipped."""
    strict, training = (content.BagOfWords({"words": ["a", "circle", "red"]}, skip_unknown=skip) for skip in (0, 1))
    with pytest.raises(ValueError, match="unknown word 'crimson' in 'a crimson circle'.*3 words: a, circle, red"):
        strict(["a crimson circle"])
    with pytest.raises(ValueError, match="holds no word"):
        strict(["?!"])
    assert torch.equal(training(["a crimson circle"])[1], strict(["a circle"])[1])
    classes = content.BagOfWords({"classes": ["biking"]}, skip_unknown=True)
    with pytest.raises(ValueError, match="unknown class 'surfing'"):
        classes(["Surfing"])


def test_ucf_unet_on_meta_takes_one_hot_classes():
    with torch.device("meta"):
        unet = content.scratch_unet(content.PRESETS["ucf"]["unet"], 101, (64, 64))
        out = unet_model_fn(unet)(torch.empty(2, 3, 64, 64), torch.zeros(2), torch.empty(2, 1, 101))
    assert out.shape == (2, 3, 64, 64) and 400e6 < sum(p.numel() for p in unet.parameters()) < 420e6


def test_sd21_unet_on_meta():
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD21_UNET_CONFIG)
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n - 865_910_724) / 865_910_724 < 0.005
    out = unet(torch.randn(1, 4, 64, 128, device="meta"), torch.tensor([10], device="meta"),
               encoder_hidden_states=torch.randn(1, 77, 1024, device="meta")).sample
    assert out.shape == (1, 4, 64, 128)


# --- training stages 2 and 3 on the AE's latents -----------------------------------------------------

def test_latent_cache_is_reused_and_encoded_again_when_its_source_changes(tmp_path):
    _, trained = train_micro(tmp_path, steps=2)  # the EMA model: frozen, as stages 2 and 3 load it
    frame_space, videos, path = ae.FrameSpace("", "cpu"), micro_dataset(6), tmp_path / "latents.safetensors"
    items = data.cache_latents(trained, frame_space, videos, path, "cpu", {"ae": "trained"})
    content_frames, motion_latents = trained.encode(torch.stack([videos[i][0] for i in range(6)]))
    torch.testing.assert_close(torch.stack([c for c, _, _ in items]), content_frames)
    torch.testing.assert_close(torch.stack([m for _, m, _ in items]), motion_latents)
    assert [caption for _, _, caption in items] == [videos[i][1] for i in range(6)]

    class NoEncoding:
        def encode(self, frames):
            raise AssertionError("encoded again")

    again = data.cache_latents(NoEncoding(), frame_space, videos, path, "cpu", {"ae": "trained"})  # read back
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(items, again))
    other = ae.Autoencoder(MICRO).eval()  # another AE: the cache is stale, and encoded again
    fresh = data.cache_latents(other, frame_space, videos, path, "cpu", {"ae": "other"})
    with torch.no_grad():
        torch.testing.assert_close(fresh[0][0], other.encode(videos[0][0][None])[0][0])
    assert not torch.allclose(fresh[0][0], items[0][0])


def latent_pairs(n=8):
    """(content frame, motion latent, caption) triples, as a --cache file gives them to stages 2 and 3."""
    g = torch.Generator().manual_seed(0)
    captions = ["a red circle moving left", "a blue square moving up"]
    return [(torch.rand(3, 8, 8, generator=g) * 2 - 1, torch.rand(4, 4, 4, generator=g) * 2 - 1, captions[i % 2])
            for i in range(n)]


@pytest.mark.parametrize("stage", ["content", "motion"])
def test_short_diffusion_training_run_loss_drops(stage, tmp_path):
    """Stages 2 and 3 through the shared harness on a fixed tiny set: the diffusion loss,
    measured at fixed noise and timesteps, goes down."""
    torch.manual_seed(0)
    te = build_text_encoder("tiny")
    diffusion = Diffusion(prediction_type="v_prediction")
    if stage == "content":
        model = content.scratch_unet(TINY_UNET, te.width, sample_size=8)

        def loss_fn(model, batch):
            return diffusion.loss(content.unet_model_fn(model), batch[0], te(list(batch[2]))[0])
    else:
        model = MotionDiT(replace(TINY_DIT, frames=4, latent_h=2, latent_w=2, latent_dim=4,
                                  frame_height=8, frame_width=8, hidden=32, depth=2, heads=2))

        def loss_fn(model, batch):
            tokens, pooled = te(list(batch[2]))
            return diffusion.loss(motion.dit_model_fn(model), batch[1], (batch[0], tokens, pooled))

    pairs = latent_pairs()
    batch = [torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs]), [p[2] for p in pairs]]

    def fixed_loss(model):
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)
            return sum(loss_fn(model, batch).item() for _ in range(8))

    before = fixed_loss(model)
    trained = data.train(stage, model, loss_fn, pairs, training_args(tmp_path, steps=200, batch_size=8, every=200), {})
    assert fixed_loss(trained) < 0.7 * before


# ==================================================================================================
# motion.py: the motion DiT
# ==================================================================================================

# the tiny preset's DiT for its AE and a 64-wide text encoder: it reads the text tokens too (cross-attention,
# attention pooling); the paper preset's for its AE and ViT-H-14's text
TINY_DIT = motion.config_for("tiny", None, ae.preset_config("tiny"), (64, 64))
PAPER_DIT = motion.config_for("paper", None, ae.preset_config("paper"), (1024, 1024))


TINY_DIT_POOLED = replace(TINY_DIT, cross_attention=False, pool_text=False)  # the paper's: the pooled text only


def perturbed_model(config, seed=0):
    """A model moved away from its zero init, so that its output is not trivially 0."""
    torch.manual_seed(seed)
    model = MotionDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("config", [TINY_DIT, TINY_DIT_POOLED], ids=["tiny", "pooled text only"])
def test_output_is_exactly_zero_at_init(config):
    torch.manual_seed(0)
    inputs = example_inputs(config, batch=2)
    out = MotionDiT(config)(*inputs)
    assert out.shape == inputs[0].shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero gates + zero final layer


def test_cfg_in_one_batch_equals_two_passes():
    model = perturbed_model(TINY_DIT)
    z, t, content, tokens, pooled = example_inputs(TINY_DIT, batch=2)
    _, _, _, null_tokens, null_pooled = example_inputs(TINY_DIT, batch=2)  # stands in for ""
    with torch.no_grad():
        cond = model(z, t, content, tokens, pooled)
        uncond = model(z, t, content, null_tokens, null_pooled)
        both = model(torch.cat([z, z]), torch.cat([t, t]), torch.cat([content, content]),
                     torch.cat([tokens, null_tokens]), torch.cat([pooled, null_pooled]))
    assert not torch.allclose(cond, uncond)  # the text really conditions the output
    torch.testing.assert_close(both, torch.cat([cond, uncond]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention_matches_naive_softmax(cross):
    torch.manual_seed(0)
    dim, heads, context_dim = 32, 4, 24
    attn = ae.Attention(dim, heads, context_dim=context_dim if cross else None)
    x = torch.randn(2, 7, dim)
    context = torch.randn(2, 5, context_dim) if cross else x
    if cross:
        q = x @ attn.to_q.weight.T + attn.to_q.bias
        k, v = (context @ attn.to_kv.weight.T + attn.to_kv.bias).chunk(2, dim=-1)
    else:
        q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).chunk(3, dim=-1)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, dim // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1)
    naive = (weights @ v).transpose(1, 2).reshape(2, 7, dim) @ attn.proj.weight.T + attn.proj.bias
    ours = attn(x, context if cross else None)
    torch.testing.assert_close(ours, naive, atol=1e-5, rtol=1e-5)


def forward_flops(config, batch):
    """(parameters, FLOPs of one forward at this batch) of a DiT built on `meta`."""
    with torch.device("meta"):
        model = MotionDiT(config)
    inputs = example_inputs(config, batch, device="meta")
    return sum(p.numel() for p in model.parameters()), data.count_flops(lambda: model(*inputs))[0]


def test_paper_preset_size_and_flops_on_meta():
    config = PAPER_DIT
    params, flops1 = forward_flops(config, batch=1)
    _, flops2 = forward_flops(config, batch=2)
    print(f"\nmotion DiT paper preset (DiT-XL/2, 384 motion + 128 content tokens): "
          f"{params / 1e6:.1f} M params, {flops1 / 1e12:.3f} TFLOPs/forward at batch 1, "
          f"{flops2 / 1e12:.3f} at batch 2 (CFG); CFG sampling: {50 * flops2 / 1e12:.1f} TFLOPs "
          f"for 50 steps, {100 * flops2 / 1e12:.1f} for the paper's 100")
    # DiT-XL/2 is ~675 M parameters (DiT paper); with SD-2.1's 866 M UNet that is the
    # paper's "1.6B" for CMD (Table 10).
    assert 600e6 < params < 750e6
    # ~28 blocks x 2 x 16 M weights x 512 tokens: 0.3-0.7 TFLOPs; CFG doubles it exactly.
    assert 0.3e12 < flops1 < 0.7e12
    assert flops2 == 2 * flops1


def test_flops_match_the_papers_training_table():
    # Paper Table 8: motion diffusion, 16 frames at 512x512 (SD latents 64x64), batch 1:
    # 0.14 "TFLOPs" from fvcore, which counts a multiply-add once; FlopCounterMode counts 2.
    config = replace(PAPER_DIT, latent_w=32, frame_width=64)
    _, flops = forward_flops(config, batch=1)
    print(f"\n512x512: {flops / 2e12:.3f} T multiply-adds per forward (paper: 0.14)")
    assert 0.12 < flops / 2e12 < 0.17


def test_save_load_roundtrip(tmp_path):
    model = perturbed_model(TINY_DIT)
    save_file(model.state_dict(), tmp_path / "motion.safetensors")
    (tmp_path / "motion.json").write_text(json.dumps(asdict(model.config)))

    config = MotionConfig(**json.loads((tmp_path / "motion.json").read_text()))
    loaded = MotionDiT(config).eval()
    loaded.load_state_dict(load_file(tmp_path / "motion.safetensors"))
    inputs = example_inputs(TINY_DIT, batch=2)
    with torch.no_grad():
        out = model(*inputs)
    assert out.abs().max() > 0.1
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), out)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = perturbed_model(TINY_DIT).train()
    inputs = example_inputs(TINY_DIT, batch=2)
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(*inputs).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        model.enable_gradient_checkpointing()  # for the second pass
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_a_few_steps_fit_a_fixed_batch():
    torch.manual_seed(0)
    model = MotionDiT(TINY_DIT).train()
    inputs = example_inputs(TINY_DIT, batch=4)
    target = torch.randn_like(inputs[0])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = (model(*inputs) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    print(f"\nloss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]


def test_wrong_latent_shape_is_a_clear_error():
    z, *rest = example_inputs(TINY_DIT, batch=1)
    with pytest.raises(ValueError, match="motion latent"):
        MotionDiT(TINY_DIT)(z[:, :, :-2], *rest)


def test_ucf_preset_is_dit_b2_reading_the_class_through_adaln():
    config = motion.config_for("ucf", None, ae.preset_config("ucf"), (101, 101))
    with torch.device("meta"):
        model = MotionDiT(config)
        z, t, content_frame, _, _ = example_inputs(config, 2, device="meta")
        one_hot = torch.empty(2, 1, 101)
        assert model(z, t, content_frame, one_hot, one_hot[:, 0]).shape == (2, 16, 64, 8)
    assert model.text_embed.in_features == 101 and not config.cross_attention and not config.pool_text
    assert 125e6 < sum(p.numel() for p in model.parameters()) < 135e6  # DiT-B/2's 130 M
    assert model.motion_pos.shape[0] + model.content_pos.shape[0] == 256 + 256  # z's 8 x 32, x̄'s 16 x 16


def test_pure_bf16_weights_run_without_autocast():
    model = perturbed_model(TINY_DIT).to(torch.bfloat16)
    inputs = [x.to(torch.bfloat16) for x in example_inputs(TINY_DIT, batch=2)]
    with torch.no_grad():
        out = model(*inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# ==================================================================================================
# sample.py: text -> video; and every stage as a user runs it
# ==================================================================================================

# --- sampling ----------------------------------------------------------------------------------------

def test_prompt_to_video_files(run_dir, tmp_path):
    prompt = "a red circle moving left on a dark background"
    sample.main([prompt, "--run", str(run_dir), "--steps", "2", "--out", str(tmp_path / "out"), "--seed", "3"])
    stem = tmp_path / "out" / "a-red-circle-moving-left-on-a-dark-background-3"
    for suffix in (".mp4", ".gif"):
        assert data.read_video(f"{stem}{suffix}").shape == (16, 32, 32, 3)
    assert Image.open(f"{stem}.png").size == (32, 32)


def test_batch_of_videos_per_prompt_from_a_file(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a blue square growing on a light background\n\n  a green triangle moving up  \n")
    sample.main(["--prompts", str(prompts), "--run", str(run_dir), "--steps", "2", "--num", "2",
                 "--format", "gif", "--out", str(tmp_path)])
    names = sorted(p.name for p in tmp_path.glob("*.gif"))
    assert names == [f"a-blue-square-growing-on-a-light-background-0-{k}.gif" for k in (0, 1)] + \
                    [f"a-green-triangle-moving-up-0-{k}.gif" for k in (0, 1)]
    a, b = (data.read_video(tmp_path / name) for name in names[:2])
    assert not np.array_equal(a, b)  # two different videos in one batch


def test_same_seed_same_video(run_dir):
    models = sample.load_models(run_dir, "cpu")

    def generate(seed):
        return sample.generate(models, ["a yellow triangle rotating on a dark background"], 2, 3, 3.0, 3.0,
                               torch.Generator("cpu").manual_seed(seed), progress=False)[0]

    first = generate(0)
    assert first.shape == (1, 16, 3, 32, 32)
    assert torch.equal(first, generate(0))
    assert not torch.equal(first, generate(1))


def test_given_content_frame_or_motion_latent_skips_that_diffusion(run_dir):
    models = sample.load_models(run_dir, "cpu")
    torch.manual_seed(0)
    content_frame, motion_latent = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 16, 16, 8) * 2 - 1
    both = sample.generate(models, ["a red circle", "a red circle"], 2, content_frame=content_frame,
                           motion_latent=motion_latent, progress=False)[0]
    decoded = models.ae.decode(content_frame, motion_latent).clamp(-1, 1)  # no diffusion left: the decoder
    torch.testing.assert_close(both, decoded.expand(2, -1, -1, -1, -1))
    image_to_video = sample.generate(models, ["a red circle"], 2, content_frame=content_frame, progress=False)
    torch.testing.assert_close(image_to_video[1], content_frame.clamp(-1, 1))  # the picture is the content frame
    transfer = sample.generate(models, ["a red circle"], 2, motion_latent=motion_latent, progress=False,
                               generator=torch.Generator().manual_seed(0))
    assert transfer[0].shape == (1, 16, 3, 32, 32) and not torch.equal(transfer[0], both[:1])


def test_image_to_video_and_motion_transfer_from_files(run_dir, tmp_path, capsys):
    picture = np.zeros((40, 60, 3), np.uint8)
    picture[:, 5:55] = (220, 40, 40)  # a red band: resized to cover 32x32 and centre-cropped, all red
    Image.fromarray(picture).save(tmp_path / "picture.png")
    sample.main(["a red square", "--image", str(tmp_path / "picture.png"), "--run", str(run_dir), "--steps", "2",
                 "--out", str(tmp_path / "out"), "--format", "mp4"])
    assert data.read_video(tmp_path / "out" / "a-red-square-0.mp4").shape == (16, 32, 32, 3)
    content_image = np.asarray(Image.open(tmp_path / "out" / "a-red-square-0.png")).astype(int)
    assert content_image.shape == (32, 32, 3) and np.abs(content_image - (220, 40, 40)).max() <= 2
    clip = np.stack([data.render_shapes(data.ShapesDataset(seed=3).attributes(0), frames=20)])[0]
    data.write_video(tmp_path / "clip.mp4", clip)
    sample.main(["a green triangle", "--motion-from", str(tmp_path / "clip.mp4"), "--run", str(run_dir),
                 "--steps", "2", "--out", str(tmp_path / "out"), "--format", "gif"])
    assert data.read_video(tmp_path / "out" / "a-green-triangle-0.gif").shape == (16, 32, 32, 3)
    (tmp_path / "not-a-picture.png").write_text("text")
    data.write_video(tmp_path / "short.mp4", clip[:8])
    capsys.readouterr()  # the progress bars so far
    for flag, path, words in [("--image", "missing.png", ["cannot read --image", "missing.png"]),
                              ("--image", "not-a-picture.png", ["cannot read --image"]),
                              ("--motion-from", "short.mp4", ["short.mp4", "8 frames"])]:
        fails_with(["a red circle", flag, str(tmp_path / path), "--run", str(run_dir), "--out", str(tmp_path)],
                   capsys, *words)


# --- bad input: one line on stderr, exit status 2 ----------------------------------------------------

def test_missing_and_half_written_runs(run_dir, tmp_path, capsys):
    fails_with(["a red circle", "--run", str(tmp_path / "nowhere"), "--out", str(tmp_path)], capsys,
               "not found", "python ae.py")
    half = shutil.copytree(run_dir, tmp_path / "half")
    info = json.loads((half / "motion.json").read_text())
    (half / "motion.json").write_text(json.dumps({**info, "step": 7}))  # weights still at step 0
    fails_with(["a red circle", "--run", str(half), "--out", str(tmp_path)], capsys, "half-written")


def test_run_without_its_tiny_text_encoder_is_incomplete(run_dir, tmp_path, capsys):
    incomplete = shutil.copytree(run_dir, tmp_path / "incomplete")
    for path in incomplete.glob("text_encoder.*"):
        path.unlink()
    files = sorted(incomplete.iterdir())
    with pytest.raises(FileNotFoundError, match="incomplete"):
        content.load_content(incomplete)
    assert sorted(incomplete.iterdir()) == files  # loading writes nothing into the run
    fails_with(["a red circle", "--run", str(incomplete), "--out", str(tmp_path)], capsys, "incomplete")


def test_missing_default_checkpoint_says_how_to_make_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sample, "DEFAULT_RUN", tmp_path / "checkpoints" / "shapes-tiny")
    fails_with(["a red circle", "--out", str(tmp_path)], capsys, "python ae.py --out", "python motion.py --out")


def test_run_mixing_presets(run_dir, tmp_path, capsys):
    mixed = shutil.copytree(run_dir, tmp_path / "mixed")
    small = ae.preset_config("tiny", (16, 16))  # an AE of another preset
    data.save_stage(mixed, "ae", ae.Autoencoder(small), 0, asdict(small))
    fails_with(["a red circle", "--run", str(mixed), "--out", str(tmp_path)], capsys, "mixes stages")


def test_bad_prompts_and_output_folder(run_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    fails_with(["--prompts", str(empty), "--run", str(run_dir)], capsys, "no prompts")
    fails_with(["   ", "--run", str(run_dir)], capsys, "blank")
    a_file = tmp_path / "file"
    a_file.write_text("")
    fails_with(["a red circle", "--run", str(run_dir), "--out", str(a_file / "out")], capsys, "cannot write")


@pytest.mark.parametrize("stage", [ae, content, motion])
def test_a_preset_row_sets_the_flags_it_names_and_no_other(stage, monkeypatch):
    """Each flag of `--preset P` is P's row value where the row names it, else the flag's own default: no
    row lends another its values (the tiny row's cosine decay, middle-frame pull and no EMA once did)."""
    class Parsed(Exception):
        pass

    def parse(parser, *args):
        defaults = {action.dest: action.default for action in parser._actions}
        raise Parsed(defaults, data.parse_stage_args(parser, *args))
    monkeypatch.setattr(stage, "parse_stage_args", parse)
    for preset, row in stage.PRESETS.items():
        with pytest.raises(Parsed) as parsed:
            stage.main(["--preset", preset, "--flops"])
        defaults, args = parsed.value.args
        for flag, default in defaults.items():
            if flag not in ("preset", "flops", "out", "help"):
                assert getattr(args, flag) == row.get(flag, default), (preset, flag)
        assert args.out == f"runs/{preset}"
    assert stage.PRESETS["paper"].get("decay") is None and stage.PRESETS["paper"].get("ema_decay") in (None, 0.0)


def test_the_quick_start_samples_from_the_shipped_checkpoint(tmp_path):
    """The README's first command on checkpoints/shapes-tiny, as it ships: the video shows what it asks for."""
    sample.main(["a red circle moving left on a dark background", "--out", str(tmp_path)])
    video = data.read_video(tmp_path / "a-red-circle-moving-left-on-a-dark-background-0.mp4")
    assert video.shape == (16, 32, 32, 3) and shapes.detect(video) == ("red", "circle", "left", "dark")


def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(Path(sample.__file__)), "a red circle", "--run", str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stderr.strip().startswith("sample.py: error:")


def test_a_finished_run_is_not_overwritten_and_resume_needs_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after the test
    run_stage_one_step(ae, tmp_path / "run")
    capsys.readouterr()
    fails_with(["--out", str(tmp_path / "run"), "--steps", "1"], capsys, "already holds", "ae.json", "--resume",
               stage=ae)
    fails_with(["--out", str(tmp_path / "empty"), "--resume"], capsys, "no ae checkpoint", stage=ae)


def test_bad_paper_input_is_one_line_before_any_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    paper = ["--preset", "paper", "--out", str(out)]
    fails_with(paper, capsys, "pass --data", stage=ae)
    (tmp_path / "a.mp4").write_bytes(b"not a video")
    (tmp_path / "b.mp4").write_bytes(b"")
    bad_csv = paper_check.write_csv(tmp_path / "bad.csv", [("a.mp4", "one"), ("b.mp4", "two"), ("c.mp4", "three")])
    fails_with([*paper, "--data", str(bad_csv), "--resolution", "100x200"], capsys, "multiples of 16", "96x192",
               stage=ae)
    (tmp_path / "not-sd").mkdir()
    fails_with([*paper, "--data", str(bad_csv), "--sd", str(tmp_path / "not-sd")], capsys,
               "not a Stable Diffusion folder", stage=ae)
    fails_with(["--data", str(bad_csv), "--out", str(out)], capsys, "no usable video", "bad.csv", stage=ae)
    # text weights of another model: a 32-wide tower where the config asks for 64
    ae_run = tmp_path / "ae-run"
    ae_run.mkdir()
    data.save_stage(ae_run, "ae", ae.Autoencoder(ae.preset_config("tiny")), 0, asdict(ae.preset_config("tiny")))
    weights = paper_check.write_text_checkpoint(tmp_path / "clip.pt", paper_check.TOY_TEXT)
    (tmp_path / "wide.json").write_text(json.dumps({**TINY_TEXT_CONFIG, "vision_cfg": {}}))
    fails_with(["--ae", str(ae_run), "--out", str(out), "--text", str(tmp_path / "wide.json"),
                "--text-weights", str(weights)], capsys, "another model", stage=content)
    (tmp_path / "corrupt.bin").write_bytes(b"\x80\x02 not a checkpoint" * 10)
    fails_with(["--ae", str(ae_run), "--out", str(out), "--text", str(tmp_path / "wide.json"),
                "--text-weights", str(tmp_path / "corrupt.bin")], capsys, "corrupt.bin", "not an open_clip",
               stage=content)
    assert not out.exists()


# --- the stage commands, end to end ------------------------------------------------------------------

def test_one_seed_makes_one_run(tmp_path, monkeypatch):
    """--seed fixes the initial weights too, not only the batches and the noise: torch seeds each
    new process at random, so a stage that built its model before seeding trained a new one each time."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after the test
    for out in ("a", "b"):
        for stage in (ae, content, motion):
            run_stage_one_step(stage, tmp_path / out)
    for name in ("ae", "content", "motion"):
        a, b = (load_file(tmp_path / out / f"{name}.safetensors") for out in ("a", "b"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_tiny_stages_sample_on_the_schedule_they_trained_on(tmp_path, monkeypatch):
    """The tiny UNet (with Min-SNR-20) and the tiny DiT (with the plain loss) train on the zero-terminal-SNR
    schedule (x_T pure noise, as where sampling starts), and the run keeps that schedule, so
    sample.py's DDIM uses the same one, its last step to alpha = 1."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after the test
    for stage in (ae, content, motion):
        run_stage_one_step(stage, tmp_path / "run")
    _, _, content_diffusion, content_config = content.load_content(tmp_path / "run")
    dit, motion_diffusion = motion.load_motion(tmp_path / "run")
    for diffusion in (content_diffusion, motion_diffusion):
        assert diffusion.alphas_cumprod[-1] == 0 and diffusion.alphas_cumprod[0] > 0.99 and diffusion.final_alpha == 1
    assert content_config.zero_terminal_snr and content_config.snr_gamma == 20.0
    assert dit.config.zero_terminal_snr and dit.config.snr_gamma is None


def stages_worker(rank, out, ports):
    """Each stage's command under a two-process gloo group, as torchrun runs it."""
    def note_writer(*args, **kwargs):
        with open(out / "previews-written-by", "a") as f:
            f.write(f"{rank}\n")

    ae.write_preview = content.write_image = motion.write_motion_preview = note_writer
    count_ddp_alive_at_teardown(out / f"ddp-alive-{rank}")
    for stage, port in zip((ae, content, motion), ports):  # each stage joins a new group
        join_as_gloo_rank(rank, port)
        run_stage_one_step(stage, out / "run")


def test_under_torchrun_every_stage_trains_and_only_rank_0_writes_previews(tmp_path):
    spawn_two(stages_worker, tmp_path, [free_port() for _ in range(3)])
    assert (tmp_path / "previews-written-by").read_text() == "0\n0\n0\n"  # ae, content, motion
    assert [(tmp_path / f"ddp-alive-{r}").read_text() for r in (0, 1)] == ["0\n0\n0\n"] * 2  # each stage's teardown
    for stage in ("ae", "content", "motion"):
        assert data.load_stage(tmp_path / "run", stage)[0]["step"] == 1


# The README's paper-preset commands for one GPU (test_paper_path_end_to_end checks they are there).
PAPER_COMMANDS = [
    "python ae.py --preset paper --sd stable-diffusion-2-1-base --data webvid.csv --grad-accum 256 "
    "--grad-checkpointing",
    "python content.py --preset paper --sd stable-diffusion-2-1-base --text-weights open_clip_vit_h14.bin "
    "--data webvid.csv --grad-accum 256 --grad-checkpointing",
    "python motion.py --preset paper --text-weights open_clip_vit_h14.bin --data webvid.csv --grad-accum 256 "
    "--grad-checkpointing",
    'python sample.py "a corgi running on the beach" --run runs/paper --device cuda',
]


def test_ucf_end_to_end(ucf_folder, vgg_file, i3d_file, tmp_path):
    """The ucf commands as a user runs them, on a UCF-101-shaped folder at 16x16 (the preset's AE; the
    tiny UNet and DiT: --size), one step each; then a class by its name, and FVD the field's way."""
    run = tmp_path / "runs" / "ucf"
    common = ["--preset", "ucf", "--data", str(ucf_folder), "--out", str(run), "--steps", "1", "--batch-size", "1",
              "--grad-accum", "1"]
    commands = [["ae.py", *common, "--resolution", "16x16", "--lpips-vgg", str(vgg_file)],
                ["content.py", *common, "--size", "tiny"], ["motion.py", *common, "--size", "tiny"],
                ["sample.py", "ApplyEyeMakeup", "--run", str(run), "--steps", "2", "--out", str(tmp_path / "samples")],
                ["sample.py", "jump rope", "--run", str(run), "--steps", "2", "--out", str(tmp_path / "samples")],
                ["tools/evaluate.py", "--run", str(run), "--data", str(ucf_folder), "--i3d", str(i3d_file),
                 "--num-videos", "3", "--steps", "2", "--save-features", str(tmp_path / "real.npz")]]
    outputs = []
    for script, *argv in commands:
        outputs.append(subprocess.run([sys.executable, str(Path(__file__).parent / script), *argv], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=300))
        assert outputs[-1].returncode == 0, outputs[-1].stderr[-3000:]
    assert content.load_text_encoder(run).config["classes"] == ["apply eye makeup", "biking", "jump rope"]
    for name in ("applyeyemakeup", "jump-rope"):  # the folder's spelling, and the caption's
        assert data.read_video(tmp_path / "samples" / f"{name}-0.mp4").shape == (16, 16, 16, 3)
    result = json.loads(outputs[-1].stdout.strip().splitlines()[-1])
    assert result["fvd"] > 0 and result["protocol"]["fvd"] == "stylegan-v"
    assert result["protocol"]["prompts"] == "its 3 classes, uniformly"
    real = np.load(tmp_path / "real.npz")["features"]  # the real set (testlist01) as the stand-in I3D saw it
    assert given(real, "T", "H", "W", "uint8", "rescale", "resize") == [16, 16, 16, 1, 1, 1]
    unknown = subprocess.run([sys.executable, str(Path(__file__).parent / "sample.py"), "Surfing", "--run", str(run)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "unknown class 'surfing'" in unknown.stderr and "apply eye makeup" in unknown.stderr


def run_commands(commands, cwd):
    """Each command as a user types it (`script argv...`), in a subprocess: all end well, no traceback."""
    outputs = []
    for script, *argv in commands:
        outputs.append(subprocess.run([sys.executable, str(Path(__file__).parent / script), *argv], cwd=cwd,
                                      capture_output=True, text=True, timeout=300))
        assert outputs[-1].returncode == 0 and "Traceback" not in outputs[-1].stderr, outputs[-1].stderr[-3000:]
    return outputs


def test_tiny_preset_trains_on_your_own_clips(tmp_path):
    """The tiny preset's three commands and sample.py on a user's clips (USER_CLIPS): the bag of words takes
    every caption's words, held-out ones too; a prompt is one of the captions, as typed; a word the run never
    saw is a one-line error."""
    listing = user_clips(tmp_path / "clips")
    common = ["--data", str(listing), "--out", "run", "--steps", "2", "--batch-size", "2"]
    outputs = run_commands([["ae.py", *common], ["content.py", *common], ["motion.py", *common],
                            ["sample.py", USER_CLIPS[0][-1], "--run", "run", "--steps", "2", "--out", "samples"]],
                           tmp_path)
    words = content.word_vocabulary(caption for *_, caption in USER_CLIPS)[0]
    assert content.load_text_encoder(tmp_path / "run").config == {"words": words}
    assert f"text: a bag of {len(words)} words" in outputs[1].stdout and "日本語" in words and "café" in words
    assert data.read_video(tmp_path / "samples" / "tv-color-bars-broadcast-test-static-0.mp4").shape == (16, 32, 32, 3)
    unknown = subprocess.run([sys.executable, str(Path(__file__).parent / "sample.py"), "a crimson blob", "--run",
                              "run"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert "unknown word 'crimson'" in unknown.stderr


def test_ucf_preset_on_class_folders_without_split_files(tmp_path, capsys, monkeypatch):
    """A user's small class-conditional set: two class folders, one video each, no split files. The held-out
    slice takes one class's only video; the run knows both classes, says which has no training video, and
    samples either. The same preset on the captioned clips: each caption is a class."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after the test
    clips = user_clips(tmp_path / "clips").parent
    for k, name in enumerate(("YoYo", "ApplyEyeMakeup")):
        (tmp_path / "classes" / name).mkdir(parents=True)
        shutil.copy(clips / USER_CLIPS[k + 4][0], tmp_path / "classes" / name)
    said = {}
    for listing, prompt in ((tmp_path / "classes", "apply eye makeup"), (clips / "clips.csv", USER_CLIPS[3][-1])):
        run = tmp_path / f"run-{listing.stem}"
        common = ["--preset", "ucf", "--data", str(listing), "--out", str(run), "--steps", "1", "--batch-size", "1",
                  "--grad-accum", "1"]
        ae.main([*common, "--resolution", "16x16", "--loss", "mse"])
        content.main([*common, "--size", "tiny"])
        motion.main([*common, "--size", "tiny"])
        sample.main([prompt, "--run", str(run), "--steps", "2", "--out", str(tmp_path / "samples"), "--format", "mp4"])
        assert data.read_video(tmp_path / "samples" / f"{sample.slug(prompt)}-0.mp4").shape == (16, 16, 16, 3)
        said[listing.stem] = capsys.readouterr().out
    assert content.load_text_encoder(tmp_path / "run-classes").config["classes"] == ["apply eye makeup", "yo yo"]
    assert "text: a bag of 2 classes" in said["classes"] and "no training video of 1: apply eye makeup" in said["classes"]
    classes = content.load_text_encoder(tmp_path / "run-clips").config["classes"]
    assert classes == sorted(data.class_caption(caption) for *_, caption in USER_CLIPS)


def test_flops_count_at_the_sizes_of_the_run_ae_names(tmp_path, capsys):
    """--flops --ae RUN: the run's AE (a 64x128 tiny AE) and its saved text encoder (3 words) set the sizes;
    without --ae, the preset's, said in one line."""
    run = tmp_path / "p"
    run.mkdir()
    config = ae.preset_config("tiny", (64, 128))
    data.save_stage(run, "ae", ae.Autoencoder(config), 0, asdict(config))
    content.save_text_encoder(content.BagOfWords({"words": ["a", "blob", "drifting"]}), run)
    with torch.device("meta"):
        unet = content.scratch_unet(TINY_UNET, 3, (64, 128), 3)
    dit, dit_loss = motion.training_step(motion.config_for("tiny", None, config, (3, 3)), text_len=1)
    expected = {content: (sum(p.numel() for p in unet.parameters()),
                          data.count_flops(lambda: content.training_step(unet, (3, 64, 128), (1, 3))().backward())[0]),
                motion: (sum(p.numel() for p in dit.parameters()), data.count_flops(lambda: dit_loss().backward())[0])}
    for stage in (content, motion):
        assert stage.main(["--flops", "--ae", str(run)]) == expected[stage]
        assert f"sizes of the run {run}: its AE (64 x 128 videos), its text encoder" in capsys.readouterr().out
        assert stage.main(["--flops"])[1] < expected[stage][1] / 4  # 32x32, the shapes world's 24 words
        assert ("sizes assumed (no --ae run named): the tiny preset's AE at 32x32, a bag of the shapes world's 24 "
                "words") in capsys.readouterr().out
    fails_with(["--flops", "--ae", str(tmp_path / "missing")], capsys, "ae.json not found", stage=motion)


def test_paper_path_end_to_end(tmp_path):
    """The four paper commands as subprocesses, on a toy Stable Diffusion 2.x folder and open_clip text
    checkpoint, and real files in three containers at sizes neither square nor 1:2, one of them corrupt.
    Only sizes and step counts change, through flags a user has too."""
    readme = " ".join((Path(__file__).parent / "README.md").read_text().split())
    assert all(command in readme for command in PAPER_COMMANDS)
    paper_check.write_sd_folder(tmp_path / "stable-diffusion-2-1-base", paper_check.TOY_UNET, paper_check.TOY_VAE)
    paper_check.write_text_checkpoint(tmp_path / "open_clip_vit_h14.bin", paper_check.TOY_TEXT)
    (tmp_path / "toy_clip.json").write_text(json.dumps(paper_check.TOY_TEXT))
    rows = []
    (tmp_path / "made").mkdir()
    for k, (suffix, codec, size) in enumerate([(".mp4", None, (96, 160)), (".avi", "mpeg4", (120, 90)),
                                               (".webm", "libvpx", (72, 200))] * 2):
        made = paper_check.write_clips(tmp_path / "made", size, count=1, seed=k)[0]
        path = tmp_path / f"clip{k}{suffix}"
        if codec:  # the same frames in another container
            write_with_pyav(path, data.read_video(made), codec)
        else:
            made.rename(path)
        rows.append((path.name, f"a blob drifting, clip {k}"))
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    paper_check.write_csv(tmp_path / "webvid.csv", rows[:3] + [("corrupt.mp4", "a corrupt file")] + rows[3:])
    toy_text = ["--text", str(tmp_path / "toy_clip.json")]
    toy = {"ae.py": ["--resolution", "64x128"], "content.py": toy_text, "motion.py": [*toy_text, "--size", "tiny"]}
    commands = [[*command.split()[1:], "--steps", "2", "--grad-accum", "1", *toy[command.split()[1]]]
                for command in PAPER_COMMANDS[:3]]
    commands.append(["sample.py", "a blob drifting", "--run", "runs/paper", "--steps", "2", "--out", "samples"])
    outputs = []
    for script, *argv in commands:
        outputs.append(subprocess.run([sys.executable, str(Path(__file__).parent / script), *argv], cwd=tmp_path,
                                      capture_output=True, text=True, timeout=300,
                                      env={**os.environ, "HF_HUB_OFFLINE": "1"}))  # no hub: fail fast
        assert outputs[-1].returncode == 0, outputs[-1].stderr[-3000:]
    assert "corrupt.mp4" in outputs[0].stderr and "skipped 1 unreadable" in outputs[0].stdout
    assert "held-out captions a blob drifting, clip" in outputs[1].stdout  # a caption with a comma, whole
    video = data.read_video(tmp_path / "samples" / "a-blob-drifting-0.mp4")
    assert video.shape == (16, 64, 128, 3)  # 16 frames, height:width = 1:2
    run = tmp_path / "runs" / "paper"
    assert ae.load_ae(run)[0].config.video_size == (64, 128)
    assert content.load_content(run)[1].config.in_channels == 4
    assert motion.load_motion(run)[0].config.frame_height == 8


# ==================================================================================================
# tools/: the shapes evaluation, the benchmark, FVD and CLIPSIM
# ==================================================================================================

# --- tools/curves.py ---------------------------------------------------------------------------------

def test_curves_smooth_the_loss_and_plot_each_stage_of_a_run(tmp_path, capsys):
    """What data.train logs into metrics.jsonl, read back per stage and drawn, a row a stage, into a PNG; the
    smoothing is the debiased EMA (its first point the first value)."""
    assert curves.smooth([1.0, 3.0, 2.0], weight=0.5) == pytest.approx([1.0, (0.25 + 1.5) / 0.75,
                                                                  (0.125 + 0.75 + 1) / 0.875])
    train_micro(tmp_path / "run", steps=4)
    args = training_args(tmp_path / "run", steps=4)
    data.train("motion", ae.Autoencoder(MICRO), ae_loss, micro_dataset(), args, vars(MICRO),
               evaluate=lambda model: {"val_loss": 0.5})
    read = curves.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [step for step, _ in read["ae"]["loss"]] == [1, 4] and read["motion"]["val_loss"] == [(2, 0.5), (4, 0.5)]
    curves.main([str(tmp_path / "run")])
    assert Image.open(tmp_path / "run" / "curves.png").size == (1000, 560)  # two stages, two rows
    assert "wrote" in capsys.readouterr().out
    fails_with([str(tmp_path / "nothing")], capsys, "metrics.jsonl not found", stage=curves)


# --- tools/shapes.py ---------------------------------------------------------------------------------

def test_detector_reads_real_videos():
    """The detector's own error rate, on videos drawn by data.py: both splits, all backgrounds."""
    truth, found = [], []
    for dataset in (data.ShapesDataset(150, seed=7), data.ShapesDataset(50, seed=7, split="heldout")):
        for i in range(len(dataset)):
            attributes = dataset.attributes(i)
            s = attributes["shapes"][0]
            truth.append((s["color"], s["shape"], s["motion"], attributes["background"]))
            found.append(shapes.detect(data.render_shapes(attributes)))
    scores = shapes.accuracy(found, truth)
    print(f"\ndetector on {len(truth)} real videos: colour, shape, motion, background {scores}")
    assert scores == [1.0] * 4
    assert shapes.detect(np.full((16, 32, 32, 3), 128, np.uint8))[:3] == ("none",) * 3


def test_a_still_content_frame_and_the_cleanliness_measures_read_real_frames():
    """The content stage alone is read off its content frame as a still image: exact on the middle frames
    of real videos (what the AE's content frame is pulled to). Real videos have no speckle and no ghosts;
    noise of +-10 is 5 units of speckle; a second blob of the shape's colour is a ghost."""
    dataset = data.ShapesDataset(120, seed=8)
    videos = [data.render_shapes(dataset.attributes(i)) for i in range(len(dataset))]
    truth = [(a["shapes"][0]["color"], a["shapes"][0]["shape"], "none", a["background"])
             for a in map(dataset.attributes, range(len(dataset)))]
    assert shapes.accuracy([shapes.detect_still(v[8]) for v in videos], truth) == [1.0] * 4
    video, colour = videos[0], truth[0][0]
    assert shapes.speckle(video) == 0 and shapes.ghost_share(video, colour) == 0
    noise = np.random.default_rng(0).integers(-10, 11, video.shape)
    assert shapes.speckle(np.clip(video.astype(int) + noise, 0, 255).astype(np.uint8)) == pytest.approx(5, abs=0.3)
    ghosted = video.copy()
    ghosted[4:8, :, 1:3] = data.COLORS[colour]  # a bar of its colour at the left, in frames 4 to 7
    assert shapes.ghost_share(ghosted, colour) == 4 / 16
    assert shapes.ghost_frames(ghosted, colour).nonzero()[0].tolist() == [4, 5, 6, 7]  # which frames


def test_eval_specs_cover_held_out_and_background():
    specs = shapes.eval_specs(200)
    assert sum(s[:3] in data.HELDOUT_COMBOS for s in specs) == 50
    assert {s[0] for s in specs} == set(data.COLORS) and {s[3] for s in specs} == {"dark", "light", "gradient"}
    assert ("red", "circle", "rotating") not in {s[:3] for s in specs}
    attributes = shapes.real_attributes(specs[:20])
    assert [tuple(a["shapes"][0][k] for k in ("color", "shape", "motion")) for a in attributes] == \
           [s[:3] for s in specs[:20]]


def oracle_generate(models, prompts, *args, **kwargs):
    """Stands in for sample.generate: draws exactly what each one-shape caption says, around the centre."""
    videos = []
    for prompt in prompts:
        words = prompt.split()
        motion_ = words[4] if words[3] == "moving" else words[3]
        dx, dy = data.DIRECTIONS.get(motion_, (0, 0))  # a moving shape's path is centred
        shape = {"color": words[1], "shape": words[2], "motion": motion_, "radius": 0.17,
                 "x": 0.5 - data.TRAVEL * dx / 2, "y": 0.5 - data.TRAVEL * dy / 2}
        videos.append(data.render_shapes({"background": words[-2], "shapes": [shape]}))
    videos = data.uint8_to_video(np.stack(videos))
    return videos, videos[:, 8]  # the content frame: the middle frame, as the AE pulls it


def blank_generate(models, prompts, *args, **kwargs):
    return torch.zeros(len(prompts), 16, 3, 32, 32), torch.zeros(len(prompts), 3, 32, 32)  # grey: nothing drawn


def test_shapes_evaluation_scores_an_oracle_1_and_a_blank_generator_0(run_dir, monkeypatch, capsys):
    for generator, score in ((oracle_generate, 1.0), (blank_generate, 0.0)):
        monkeypatch.setattr(shapes, "generate", generator)
        evaluate.main(["--shapes", "8", "--steps", "2", "--run", str(run_dir)])
        lines = capsys.readouterr().out.strip().splitlines()
        summary = json.loads(lines[-1])
        assert summary["n"] == 8 and summary["heldout_n"] == 2
        for prefix in ("", "heldout_", "motion_", "content_"):  # generated, held-out, motion stage, content stage
            assert [summary.get(f"{prefix}{k}_acc", score) for k in ("color", "shape", "motion")] == [score] * 3
        assert "content_motion_acc" not in summary  # a still content frame shows no motion
        # grey is nearest the gradient: a blank video reads as gradient, as a quarter of the captions ask
        assert summary["background_acc"] == (1.0 if score else 0.25)
        assert [summary[f"real_{k}_acc"] for k in ("color", "shape", "motion", "background")] == [1.0] * 4
        assert "| real videos | 8 | 1.000 | 1.000 | 1.000 | 1.000 |" in lines
        assert summary["real_speckle"] == summary["real_ghosts"] == 0
        assert summary["speckle"] == 0 and summary["ghosts"] == 0  # the oracle's, and a blank video's
        assert summary["ghosts_by_frame"] == [0] * 16 and set(summary["ghosts_by_motion"].values()) == {0}


def test_motion_transfer_evaluation_scores_an_oracle(run_dir, monkeypatch, capsys):
    """A transfer that works draws the prompt's colour and shape with the source's motion (the prompt names
    the same motion): the prompt's attributes score 1, the source's colour and shape, which differ, 0."""
    monkeypatch.setattr(shapes, "generate", oracle_generate)
    evaluate.main(["--motion-transfer", "6", "--steps", "2", "--run", str(run_dir)])
    summary = last_json(capsys)
    assert summary["n"] == 6 and summary["color_is_prompts"] == summary["shape_is_prompts"] == 1.0
    assert summary["motion_is_sources"] == 1.0 and summary["color_is_sources"] == summary["shape_is_sources"] == 0.0


def test_ucf_check_times_each_stage_and_its_release_days():
    result = paper_check.main(["--preset", "ucf", "--toy", "--device", "cpu"])
    for stage in ("ae", "content", "motion"):
        row = result[stage]
        assert row["batch"] * row["grad_accum"] == 256 and row["seconds_per_micro_batch"] > 0
        epochs = paper_check.UCF_EPOCHS[stage] * paper_check.UCF_VIDEOS / 256
        assert row["days_here"] == pytest.approx(epochs * row["seconds_per_step_of_256"] / 86400)


# --- tools/bench.py ----------------------------------------------------------------------------------

# The benchmark's setup at toy size: 4 frames of 4 x 8 x 16 latents, every network tiny.
TINY_SETUP = dict(
    unet=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
              norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, cross_attention_dim=16),
    unet3d=dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                norm_num_groups=8, down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=8, cross_attention_dim=16),
    vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
             norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    ae=replace(ae.preset_config("tiny"), frames=4, channels=4, patch=2, hidden=16, heads=2, encoder_depth=1,
               decoder_depth=1, motion_dim=4),
    motion=replace(motion.config_for("tiny", None, ae.preset_config("tiny"), (16, 16)), frames=4, hidden=16, depth=1,
                   heads=2),
    sample_latent=(8, 16), train_latent=(8, 8), content_steps=2, motion_steps=3, text_len=77, cfg_scale=7.5,
    frames_at_once=4,
)


def test_modelscope_step_matches_the_paper():
    # One CFG step of ModelScope's 3D UNet on 16 frames of 64x128 latents: 91.0 TFLOPs counted on `meta`;
    # in the paper's convention (MACs, one branch, no attention) x 50 steps, Table 9's 939.0 within 2%.
    unet3d = build(PAPER_SETUP, ["unet3d"], (64, 128), "meta")["unet3d"]
    with torch.device("meta"), torch.no_grad():
        video, tokens = torch.empty(2, 4, 16, 64, 128), torch.empty(2, 77, 1024)  # CFG batch 2
        flops, attention = data.count_flops(lambda: unet3d(video, torch.zeros(2), encoder_hidden_states=tokens))
    assert round(flops / 1e12, 1) == 91.0
    assert abs(50 * (flops - attention) / 4 / 1e12 - 939.0) < 0.02 * 939.0


def test_sampling_flops_tiny_cmd_below_modelscope():
    costs = sampling_flops(TINY_SETUP)
    total = {system: sum(p.tflops for p in parts) for system, parts in costs.items()}
    assert set(total) == set(SYSTEMS) and all(t > 0 for t in total.values())
    assert total["CMD"] < total["ModelScope"]
    for parts in costs.values():
        for p in parts:
            assert 0 <= p.attention < p.flops and p.calls in (2, 3, 1, TINY_SETUP["ae"].frames)
    assert [p.calls for p in costs["CMD"][:2]] == [2, 3]  # the content and the motion stage's own steps
    # frame-wise SD runs the content UNet on all frames: exactly L times CMD's content UNet
    assert costs["frame-wise SD"][0].flops == TINY_SETUP["ae"].frames * costs["CMD"][0].flops


def test_training_flops_tiny_positive_and_backward_costs_more():
    for name, (step, forward, attention) in training_flops(TINY_SETUP).items():
        assert 0 <= attention < forward < step, name
        assert step < 4 * forward, name  # backward ~ 2 forwards, plus a little


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_sample_video_runs_tiny(system):
    # The GPU timing path (real DDIM with batched CFG, then the SD decode) at toy size on the CPU.
    nets = build(TINY_SETUP, SYSTEMS[system][0], TINY_SETUP["sample_latent"], "cpu")
    text_encoder = random_text_encoder(TINY_SETUP, "cpu", torch.float32)
    video = sample_video(system, nets, text_encoder, TINY_SETUP)
    h, w = TINY_SETUP["sample_latent"]
    assert video.shape == (1, TINY_SETUP["ae"].frames, 3, 2 * h, 2 * w)  # the tiny VAE upsamples x2
    assert torch.isfinite(video).all()


def test_bench_prints_tables_and_json_last(capsys):
    result = bench(torch.device("cpu"), TINY_SETUP)
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result
    assert {"cmd_tflops", "modelscope_tflops", "framewise_tflops", "flops_seconds"} <= set(result)
    assert "| CMD |" in "\n".join(out)


def test_profile_takes_algorithm_1_apart_on_the_cpu(capsys):
    result = bench_tool.main(["--profile", "--preset", "tiny", "--device", "cpu", "--runs", "1", "--steps", "2"])
    out = capsys.readouterr().out.strip().splitlines()
    assert json.loads(out[-1]) == result and any(line.startswith("| content UNet, a DDIM step") for line in out)
    parts = [name for name, value in result.items() if isinstance(value, dict)]
    assert len(parts) == 6 and all(result[name]["seconds"] > 0 for name in parts)
    # the whole video's FLOPs are its parts' times their calls (the DDIM update itself counts 0)
    whole = result["Algorithm 1, the whole video (generate)"]["tflops"]
    assert whole == pytest.approx(sum(result[name]["calls"] * result[name]["tflops"] for name in parts[:-1]), rel=1e-6)


def test_bench_without_a_gpu_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as e:
        bench_tool.main(["--device", "cuda"])
    assert e.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err


# --- tools/evaluate.py -------------------------------------------------------------------------------

def gaussian_sample(mean, cov, n, seed):
    """n points whose sample mean and (N - 1) covariance are exactly `mean` and `cov`."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def test_frechet_distance_closed_form_for_diagonal_covariances():
    # Diagonal S_a, S_b: Tr(S_a + S_b - 2 (S_a S_b)^1/2) = sum (sqrt(a_i) - sqrt(b_i))^2.
    var_a, var_b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 0.25, 2.0])
    mean_a, mean_b = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    a, b = gaussian_sample(mean_a, np.diag(var_a), 50, 0), gaussian_sample(mean_b, np.diag(var_b), 80, 1)
    expected = ((mean_a - mean_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert evaluate.frechet_distance(a, b, "pvdm") == pytest.approx(expected, rel=1e-10)  # pvdm: unbiased covariance


def test_fvd_statistics_are_stylegan_vs_biased_ones_or_pvdms_unbiased_ones():
    x = np.random.default_rng(3).normal(2, 3, size=(50, 6))
    mean, cov = evaluate.statistics(x)  # the default: StyleGAN-V's FeatureStats.get_mean_cov
    raw_mean, raw_cov = x.sum(0), x.T @ x  # what it accumulates
    np.testing.assert_allclose(mean, raw_mean / 50, rtol=1e-12)
    np.testing.assert_allclose(cov, raw_cov / 50 - np.outer(raw_mean / 50, raw_mean / 50), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(evaluate.statistics(x, "pvdm")[1], cov * 50 / 49, rtol=1e-9)  # np.cov's N - 1
    # the default distance uses the biased one: for a shifted copy scaled by s, Tr(S) (1 - s)^2 + shift^2
    shift, scale = np.arange(6.0), 1.5
    expected = (shift ** 2).sum() + np.trace(cov) * (1 - scale) ** 2
    centred = x - mean
    assert evaluate.frechet_distance(x, mean + shift + scale * centred) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_random_covariances_match_eigenvalue_reference():
    # Independent reference: Tr((S_a S_b)^1/2) = sum of sqrt of the eigenvalues of the (non-symmetric)
    # product S_a S_b, from a general eigensolver.
    rng = np.random.default_rng(2)
    d = 6
    cov_a, cov_b = (m @ m.T + 0.1 * np.eye(d) for m in rng.normal(size=(2, d, d)))
    mean_a, mean_b = rng.normal(size=(2, d))
    a, b = gaussian_sample(mean_a, cov_a, 40, 3), gaussian_sample(mean_b, cov_b, 30, 4)
    trace_sqrt = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real).sum()
    expected = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert evaluate.frechet_distance(a, b, "pvdm") == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_zero_for_the_same_statistics_and_symmetric():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 12)), rng.normal(1, 2, size=(200, 12))
    assert evaluate.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    assert evaluate.frechet_distance(a, a[::-1]) == pytest.approx(0, abs=1e-9)  # the order of videos is no matter
    assert evaluate.frechet_distance(a, b) == pytest.approx(evaluate.frechet_distance(b, a), rel=1e-9)
    assert evaluate.frechet_distance(a, b) > 10


def test_frechet_distance_stable_when_covariances_are_singular():
    # N = 10 videos of d = 400 features (the I3D's): rank <= 9, 391 eigenvalues at rounding level,
    # whose square roots add ~1e-7 relative. A shifted copy has the same covariance: the distance
    # is the squared shift.
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(10, 400)), rng.normal(size=(12, 400))
    shift = rng.normal(size=400)
    assert evaluate.frechet_distance(a, a + shift) == pytest.approx((shift ** 2).sum(), rel=1e-6)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    trace_sqrt = np.sqrt(np.abs(np.linalg.eigvals(cov_a @ cov_b).real)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    assert evaluate.frechet_distance(a, b, "pvdm") == pytest.approx(expected, rel=1e-6)


def test_i3d_is_called_as_stylegan_v_calls_it_or_as_pvdm_does(i3d_file):
    detector = evaluate.load_i3d(i3d_file, "cpu")
    videos = random_videos(3, frames=20, height=32, width=64)  # 2:1
    features = evaluate.i3d_features(detector, videos, "cpu")  # the default: StyleGAN-V's fvd2048_16f
    assert features.dtype == np.float64 and features.shape == (3, 17)
    # its first 16 frames whole, 2:1 as they are, uint8 values in [0, 255]; the network rescales and resizes
    assert given(features, "T", "H", "W", "uint8", "rescale", "resize", "return_features") == [16, 32, 64, 1, 1, 1, 1]
    assert 0 <= features[:, GIVEN["min"]].min() and 128 < features[:, GIVEN["max"]].max() <= 255
    pvdm = evaluate.i3d_features(detector, videos, "cpu", "pvdm")  # shorter side to 224, centre crop, [-1, 1]
    assert given(pvdm, "T", "H", "W", "uint8", "rescale", "resize") == [16, 224, 224, 0, 0, 0]
    assert -1 <= pvdm[:, GIVEN["min"]].min() and pvdm[:, GIVEN["max"]].max() <= 1
    # the same features for the same video: again, and alone rather than in a batch
    np.testing.assert_array_equal(evaluate.i3d_features(detector, videos, "cpu"), features)
    alone = evaluate.i3d_features(detector, videos[1:2], "cpu")[0]
    np.testing.assert_allclose(alone[:11], features[1, :11], rtol=1e-5)  # (min and max are the batch's)
    assert not np.allclose(features[0, :8], features[1, :8])


def test_i3d_input_resizes_the_shorter_side_and_crops_the_centre():
    # A wide video: red, green, blue thirds. The shorter side -> 224 makes it 224 x 672; the centre
    # crop keeps the green third only (its outermost columns blend with the neighbours).
    video = np.zeros((16, 50, 150, 3), np.uint8)
    for third, channel in enumerate((0, 1, 2)):
        video[:, :, 50 * third:50 * (third + 1), channel] = 255
    x = evaluate.i3d_input(video, "pvdm")
    assert x.shape == (3, 16, 224, 224)
    middle = x[:, :, :, 4:-4]
    torch.testing.assert_close(middle[1], torch.ones_like(middle[1]))  # green: 255 -> 1
    torch.testing.assert_close(middle[[0, 2]], -torch.ones_like(middle[[0, 2]]))  # red, blue: 0 -> -1
    tall = evaluate.i3d_input(random_videos(1, frames=17, height=300, width=100)[0], "pvdm")
    assert tall.shape == (3, 16, 224, 224) and -1 <= tall.min() and tall.max() <= 1


def folder_dataset(asked):
    """Stands in for data.make_dataset's held-out split: the videos of a folder, their file names as
    captions; records the keywords it was called with in `asked`."""
    class VideoFolder(torch.utils.data.Dataset):
        def __init__(self, spec, **options):
            asked.append(options)
            self.paths = sorted(Path(spec).glob("*.mp4"))

        def __len__(self):
            return len(self.paths)

        def __getitem__(self, i):
            return data.uint8_to_video(data.read_video(self.paths[i])), self.paths[i].stem
    return VideoFolder


def test_fvd_of_a_video_folder_against_the_held_out_split(i3d_file, tmp_path, monkeypatch, capsys):
    asked = []
    monkeypatch.setattr(data, "make_dataset", folder_dataset(asked))
    generated = write_videos(tmp_path / "generated", random_videos(6, seed=1))
    other = write_videos(tmp_path / "other", random_videos(6, seed=2) // 2)  # darker: other statistics
    common = ["--videos", str(generated), "--i3d", str(i3d_file), "--num-videos", "6", "--device", "cpu"]
    evaluate.main(common + ["--data", str(generated)])
    same = last_json(capsys)
    assert same["fvd"] == pytest.approx(0, abs=1e-6) and same["n"] == 6
    # the held-out split at the generated videos' size, chosen as training chose it
    assert asked == [{"frames": 16, "size": (24, 40), "split": "val", "seed": 0, "val_fraction": data.VAL_FRACTION}]
    evaluate.main(common + ["--data", str(other), "--split", "all", "--data-seed", "3",
                            "--save-features", str(tmp_path / "real.npz")])
    different = last_json(capsys)
    assert asked[1]["split"] == "all" and asked[1]["seed"] == 3
    assert different["fvd"] > 1 and different["protocol"]["i3d"] == "i3d_torchscript.pt"
    evaluate.main(common + ["--real-features", str(tmp_path / "real.npz")])  # the cached real set
    assert last_json(capsys)["fvd"] == pytest.approx(different["fvd"], rel=1e-12)
    assert len(asked) == 2


def test_fvd_of_a_run_prompts_it_with_the_real_captions(run_dir, i3d_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "make_dataset", folder_dataset([]))
    real = write_videos(tmp_path / "real", random_videos(3, height=32, width=32))
    prompted = []
    generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda models, prompts, *args, **kwargs:
                        prompted.extend(prompts) or generate(models, prompts, *args, **kwargs))
    evaluate.main(["--run", str(run_dir), "--data", str(real), "--i3d", str(i3d_file), "--num-videos", "3",
                   "--steps", "2", "--batch-size", "2", "--device", "cpu"])
    result = last_json(capsys)
    assert prompted == ["000", "001", "002"]  # the captions of the real videos
    assert result["fvd"] > 0 and result["protocol"]["size"] == [32, 32]
    assert result["protocol"]["content_steps"] == result["protocol"]["motion_steps"] == 2  # --steps sets both


TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def save_open_clip(folder, name, config, weights=None):
    """Register an open_clip model config under `name` (open_clip's own machinery), build it, and save
    its state dict as open_clip checkpoints are saved; weights(model) may set the weights first."""
    (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{name}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    if weights:
        with torch.no_grad():
            weights(model)
    torch.save(model.state_dict(), folder / f"{name}.bin")
    return folder / f"{name}.bin"


def test_clipsim_matches_a_direct_open_clip_computation(tmp_path, capsys):
    weights = save_open_clip(tmp_path, "tiny-test-clip", TINY_CLIP)
    videos = random_videos(3, height=40, width=56)  # resized and cropped to the model's 32 x 32
    write_videos(tmp_path / "videos", videos)
    (tmp_path / "prompts.txt").write_text("a red circle\na dog on a beach\n")  # video 2 gets prompt 0 again
    evaluate.main(["--videos", str(tmp_path / "videos"), "--prompts", str(tmp_path / "prompts.txt"), "--num-videos",
                   "3", "--clip-model", "tiny-test-clip", "--clip-weights", str(weights), "--device", "cpu"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # Directly: open_clip's own model, transform (PIL) and tokenizer on each decoded frame.
    model, _, transform = open_clip.create_model_and_transforms("tiny-test-clip", pretrained=str(weights))
    tokenizer = open_clip.get_tokenizer("tiny-test-clip")
    cosines = []
    for k, path in enumerate(sorted((tmp_path / "videos").glob("*.mp4"))):
        images = torch.stack([transform(Image.fromarray(frame)) for frame in data.read_video(path)])
        with torch.no_grad():
            image = F.normalize(model.encode_image(images), dim=-1)
            text = F.normalize(model.encode_text(tokenizer(["a red circle", "a dog on a beach"][k % 2])), dim=-1)
        cosines.append((image @ text.T).mean().item())
    assert result["clipsim"] == pytest.approx(np.mean(cosines), abs=2e-4)  # PIL rounds resized frames to uint8
    assert "raw cosine" in out and result["protocol"]["clipsim_scale"].startswith("raw cosine")


def colour_clip_weights(model):
    """An open_clip CLIP whose image embedding is a frame's mean colour and whose text embedding is the
    colour word of the prompt: embedding dimensions 0, 1, 2 are red, green, blue."""
    for parameter in model.parameters():  # zero everything: every transformer block passes its input on
        parameter.zero_()
    for name, parameter in model.named_parameters():
        if "ln_" in name and name.endswith("weight"):
            parameter.fill_(1)  # LayerNorms normalise, no more
    model.visual.conv1.weight[[0, 1, 2], [0, 1, 2]] = 1 / 64  # token channel k: the 8 x 8 patch's mean of colour k
    model.visual.proj[:3] = torch.eye(3)
    tokenizer = open_clip.get_tokenizer("colour-test-clip")
    for k, word in enumerate(("red", "green", "blue")):
        model.token_embedding.weight[tokenizer([word])[0, 1], k] = 1  # (position 0: the start-of-text token)
    attention = model.transformer.resblocks[0].attn  # queries and keys 0: the end-of-text token averages
    attention.in_proj_weight[16:] = torch.eye(8)     # the values of all tokens, the colour word's included
    attention.out_proj.weight.copy_(torch.eye(8))
    model.text_projection[:3] = torch.eye(3)


def test_clipsim_ranks_the_matching_prompt_first(tmp_path):
    config = {"embed_dim": 3, "vision_cfg": {"image_size": 32, "layers": 0, "width": 8, "patch_size": 8,
                                             "head_width": 8, "pool_type": "avg"},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 8, "heads": 1, "layers": 1}}
    weights = save_open_clip(tmp_path, "colour-test-clip", config, colour_clip_weights)
    clip = evaluate.load_clip("colour-test-clip", weights, "cpu")
    noise = np.random.default_rng(0).normal(0, 20, (8, 24, 40, 3))
    videos = [np.clip(np.array(data.COLORS[c]) + noise, 0, 255).astype(np.uint8) for c in ("red", "green", "blue")]
    prompts = [f"a {c} circle moving left" for c in ("red", "green", "blue")]
    # similarity[i, j]: prompt i with video j
    similarity = np.stack([evaluate.clip_similarities(clip, videos, [p] * 3, "cpu") for p in prompts])
    assert (similarity.argmax(0) == [0, 1, 2]).all() and (similarity.argmax(1) == [0, 1, 2]).all()
    assert np.diag(similarity).min() > 0.5 > similarity[~np.eye(3, dtype=bool)].max()


def evaluate_fails(argv, capsys, *words):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and "{" not in out, err  # no progress began
    assert ": error: " in err and "Traceback" not in err
    for word in words:
        assert word in err, err


def test_evaluate_errors_are_one_line(i3d_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(data, "make_dataset", folder_dataset([]))
    videos = write_videos(tmp_path / "videos", random_videos(2))
    fvd = ["--videos", str(videos), "--num-videos", "2", "--data", str(videos)]
    evaluate_fails(fvd + ["--i3d", str(tmp_path / "missing.pt")], capsys, "no such file", "i3d_torchscript.pt")
    torch.save(StandInI3D().state_dict(), tmp_path / "state_dict.pt")  # weights, not a TorchScript network
    evaluate_fails(fvd + ["--i3d", str(tmp_path / "state_dict.pt")], capsys, "not a TorchScript network")
    torch.jit.save(torch.jit.script(nn.Linear(3, 3)), str(tmp_path / "linear.pt"))  # TorchScript, another call
    evaluate_fails(fvd + ["--i3d", str(tmp_path / "linear.pt")], capsys, "takes (input)")
    (tmp_path / "clip.bin").write_bytes(b"not a checkpoint")
    evaluate_fails(["--videos", str(videos), "--num-videos", "2", "--prompts", str(tmp_path / "clip.bin"),
                    "--clip-weights", str(tmp_path / "clip.bin")], capsys, "not an open_clip ViT-B-32 checkpoint")
    evaluate_fails(fvd[:2] + ["--num-videos", "3", "--data", str(videos), "--i3d", str(i3d_file)], capsys,
                   "holds 2 videos, fewer than --num-videos 3")
    generated = write_videos(tmp_path / "generated", random_videos(3))
    evaluate_fails(["--videos", str(generated), "--num-videos", "3", "--data", str(videos), "--i3d", str(i3d_file)],
                   capsys, "'val' split holds 2 videos, fewer than --num-videos 3")
    short = write_videos(tmp_path / "short", random_videos(2, frames=8))
    evaluate_fails(["--videos", str(short), "--num-videos", "2", "--data", str(videos), "--i3d", str(i3d_file)],
                   capsys, "has 8 frames, fewer than the 16")


def test_shapes_evaluation_with_fvd(run_dir, i3d_file, capsys):
    evaluate.main(["--shapes", "3", "--steps", "2", "--run", str(run_dir), "--i3d", str(i3d_file), "--device", "cpu"])
    summary = last_json(capsys)
    assert summary["n"] == 3 and summary["fvd"] > 0 and summary["real_color_acc"] == 1.0

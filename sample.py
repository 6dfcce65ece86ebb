"""Stage 4 of CMD: sampling, text -> video (arXiv 2403.14148, Algorithm 1 in App. E).

  1. text -> content frame x̄_0: DDIM with classifier-free guidance on the content UNet
     (content.py; the paper: 50 steps, eta = 0, App. B.4),
  2. (text, x̄_0) -> motion latent z_0: DDIM with guidance on the motion DiT (motion.py);
     guidance drops only the text, both branches see x̄_0,
  3. the AE decoder rebuilds the frames from (x̄_0, z_0) (ae.py), and the SD VAE decodes
     them to pixels (paper preset; the tiny preset works in pixels already),
  4. -> <out>/<prompt>-<seed>.mp4 / .gif, and the content frame as <prompt>-<seed>.png.

All three stages load from one run directory (ae.*, content.*, motion.*, text_encoder.*).
With no --run, the tiny shapes checkpoint shipped with the repo (checkpoints/shapes-tiny).

    python sample.py "a red circle moving left on a dark background"
    python sample.py "a blue square growing on a light background" --run runs/tiny --num 4 --seed 1
    python sample.py --prompts prompts.txt --format gif     # one prompt a line
    python sample.py --eval-shapes 200   # score 200 generated shapes videos (25 steps: ~3 min, one CPU core)
    python sample.py "a corgi running on the beach" --run runs/paper --device cuda   # paper scale, bf16
    python sample.py --bench             # the paper's cost tables: FLOPs (on `meta`, < 1 min, no checkpoint),
                                         # and on a GPU seconds and peak memory (--compile: torch.compile)

`--eval-shapes N` generates N shapes videos from captions of known (colour, shape, motion)
and reads those attributes back with the analytic detector `detect` below; the detector's
own error rate is measured on real videos, and the AE's on AE reconstructions of them.
`--bench` counts the work of sampling and training at the paper's scale for CMD, ModelScope
and frame-by-frame Stable Diffusion, next to the paper's Tables 8 and 9.
"""
import argparse
import itertools
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from ae import PRESETS as AE_PRESETS
from ae import Autoencoder, FrameSpace, load_ae
from content import SD21_UNET_CONFIG, Diffusion, load_content, sample_content_frames, unet_model_fn
from data import (BACKGROUNDS, COLORS, HELDOUT_COMBOS, MOTIONS, SHAPES, ShapesDataset, caption_for,
                  render_shapes, uint8_to_video, video_to_uint8, write_image, write_video)
from motion import PRESETS as MOTION_PRESETS
from motion import MotionDiT, dit_model_fn, example_inputs, load_motion, sample_motion, shapes_from

DEFAULT_RUN = Path(__file__).parent / "checkpoints" / "shapes-tiny"
HOW_TO_TRAIN = "python ae.py --out {0} && python content.py --out {0} && python motion.py --out {0}"


# ----------------------------------------------------------------------------- the pipeline

class Pipeline:
    """The three trained stages of one run directory, checked to fit together."""

    def __init__(self, run_dir, device):
        self.ae, self.frame_space = load_ae(run_dir, device)
        self.te, self.unet, self.content_diffusion, self.content_config = load_content(run_dir, device)
        self.dit, self.motion_diffusion, self.motion_config = load_motion(run_dir, device)
        check_fit(run_dir, self.ae.config, self.te, self.unet.config, self.dit.config)

    @torch.no_grad()
    def __call__(self, prompts, steps, cfg_content, cfg_motion, generator, progress=True):
        """prompts -> (videos (B, L, 3, H, W), content frames (B, 3, H, W)), pixels in [-1, 1]."""
        a = self.ae.config
        content_frame = sample_content_frames(self.te, self.unet, self.content_diffusion, prompts, steps, cfg_content,
                                              (a.channels, a.height, a.width), generator, progress, desc="content")
        motion_latent = sample_motion(self.dit, self.motion_diffusion, self.te, content_frame, prompts, steps,
                                      cfg_motion, generator, progress, desc="motion")
        frames = self.ae.decode(content_frame, motion_latent)  # x = g(x̄_0, z_0), in frame space
        return self.frame_space.decode(frames), self.frame_space.decode(content_frame[:, None])[:, 0]


def check_fit(run_dir, a, te, unet, m):
    """Stages trained with different presets load fine and fail later with a shape error:
    compare what the DiT and UNet were built for with what the AE and text encoder make."""
    made = shapes_from(a, te)
    wrong = [f"motion {k}={getattr(m, k)} but AE/text give {v}" for k, v in made.items() if getattr(m, k) != v]
    if unet.in_channels != a.channels or unet.cross_attention_dim != te.width:
        wrong.append(f"content UNet takes {unet.in_channels}-channel frames and {unet.cross_attention_dim}-wide "
                     f"text, the AE makes {a.channels} channels and the text encoder {te.width}")
    if wrong:
        raise ValueError(f"{run_dir} mixes stages of different presets ({'; '.join(wrong)}): train all three "
                         "with the same --preset into one --out")


def slug(prompt):
    """'A red circle, moving left!' -> 'a-red-circle-moving-left' (a file name)."""
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:80] or "video"


def save(videos, content_images, stem, formats, fps):
    """Write each video as <stem>[-k].mp4/.gif and its content frame as <stem>[-k].png."""
    for k, (video, image) in enumerate(zip(videos, content_images)):
        name = stem if len(videos) == 1 else f"{stem}-{k}"
        for suffix in formats:
            write_video(f"{name}{suffix}", video_to_uint8(video), fps)
        write_image(f"{name}.png", video_to_uint8(image))
        print(f"wrote {name}{{{','.join(formats)},.png}}")


# ----------------------------------------------------------------------------- the detector
# Reads (colour, shape, motion) back from a one-shape video of the shapes world (data.py).
# Measured on real videos it is exact (test_cmd.py), so accuracy on generated
# videos measures the model, not the detector.

PALETTE = np.array(list(COLORS.values()), np.float64)  # (K, 3)
HARMONIC = {"triangle": (3, 0.53), "square": (4, 0.27)}  # (n, a drawn shape's n-fold symmetry, below)


def neighbours(mask):
    """How many pixels of each 3x3 neighbourhood (itself included) are set: (L, H, W) -> (L, H, W)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    return np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2)).sum((-2, -1))


def colour_and_coverage(video):
    """uint8 (L, H, W, 3) -> (the drawn colour's name, its coverage alpha (L, H, W) in [0, 1]);
    ("none", zeros) if nothing is drawn."""
    v = video.astype(np.float64)
    width = v.shape[2]
    # Background, one colour per row (the gradient runs top to bottom): the median of the two
    # leftmost and rightmost columns over all frames, which the shapes world keeps free.
    background = np.median(v[:, :, [0, 1, width - 2, width - 1]], axis=(0, 2))  # (H, 3)
    diff = v - background[:, None]  # (L, H, W, 3)
    foreground = np.linalg.norm(diff, axis=-1) > 40  # colours are >= 150 away from any background
    if not foreground.any():
        return "none", np.zeros(v.shape[:3])
    # Every pixel is a mix  background + alpha (colour - background), alpha in [0, 1] (0 < alpha < 1
    # on anti-aliased edges). Fit alpha per pixel for each palette colour: the colour with the
    # least residual over the foreground is the one drawn.
    towards = PALETTE[:, None] - background[None]  # (K, H, 3)
    alphas = np.einsum("lhwc,khc->klhw", diff, towards) / (towards ** 2).sum(-1)[:, None, :, None]
    alphas = alphas.clip(0, 1)
    residual = ((diff[None] - alphas[..., None] * towards[:, None, :, None]) ** 2).sum(-1)
    k = (residual * foreground).sum((1, 2, 3)).argmin()
    # Keep its alpha only on and next to pixels that are mostly that colour (alpha > 0.5) and have
    # such neighbours, so that specks of noise away from the shape weigh nothing.
    core = alphas[k] > 0.5
    core &= neighbours(core) >= 3
    return list(COLORS)[k], alphas[k] * (neighbours(core) > 0)


def shape_and_motion(alpha):
    """Coverage (L, H, W) -> (shape, motion) names; "none" if fewer than two frames show a shape."""
    length, height, width = alpha.shape
    area = alpha.sum((1, 2))
    seen = area > 1  # frames that show at least a pixel's worth of the shape
    if seen.sum() < 2:
        return "none", "none"
    area = np.maximum(area, 1e-6)
    ys, xs = np.mgrid[:height, :width] + 0.5
    cx, cy = (alpha * xs).sum((1, 2)) / area, (alpha * ys).sum((1, 2)) / area  # centroids (L,)
    dx, dy = xs - cx[:, None, None], ys - cy[:, None, None]
    mass, angle = alpha * (dx ** 2 + dy ** 2), np.arctan2(dy, dx)

    def symmetry(n):
        """n-fold symmetry of the mass around the centroid, |sum alpha rho^2 e^{i n theta}| / sum alpha rho^2
        (rotation and scale invariant), median over the frames."""
        return np.median((np.abs((mass * np.exp(1j * n * angle)).sum((1, 2))) / mass.sum((1, 2)).clip(1e-6))[seen])

    # Shape: the symmetry strongest relative to a drawn shape's; a circle if neither reaches 30% of
    # it (drawn circles score < 0.05; blurred by 3x3, squares keep > 0.34 and circles < 0.2).
    scores = {shape: symmetry(n) / strength for shape, (n, strength) in HARMONIC.items()}
    shape = max(scores, key=scores.get) if max(scores.values()) > 0.3 else "circle"
    # Motion: least-squares slopes of the centroid and of log area over the frames that show the
    # shape, so that no single frame decides. A shape whose centroid travels > 10% of the frame
    # moves (drawn ones travel 1/3); otherwise its area grows (drawn: x4), shrinks (x1/4) or stays:
    # rotation.
    track = np.stack([cx, cy, np.log(area)], 1)[seen]  # (frames seen, 3)
    slope_x, slope_y, slope_area = np.polyfit(np.arange(length)[seen], track, 1)[0] * (length - 1)
    if max(abs(slope_x), abs(slope_y)) > 0.1 * width:
        if abs(slope_x) > abs(slope_y):
            return shape, "right" if slope_x > 0 else "left"
        return shape, "down" if slope_y > 0 else "up"  # image y points down
    return shape, "growing" if slope_area > np.log(1.25) else "shrinking" if slope_area < np.log(0.8) else "rotating"


def detect(video):
    """uint8 (L, H, W, 3) of one shape -> (colour, shape, motion) names, "none" for what is not there."""
    colour, alpha = colour_and_coverage(video)
    return (colour, *shape_and_motion(alpha))


# ----------------------------------------------------------------------------- evaluation on shapes

def eval_specs(n, seed=0):
    """n (colour, shape, motion, background): every 4th a held-out combination (data.HELDOUT_COMBOS,
    which training never shows), the others cycle through every other single-shape combination in
    a fixed shuffled order; backgrounds cycle dark, light, gradient."""
    seen = [c for c in itertools.product(COLORS, SHAPES, MOTIONS)
            if c not in HELDOUT_COMBOS and c[1:] != ("circle", "rotating")]  # a rotating circle looks still
    random.Random(seed).shuffle(seen)
    held_out, others = itertools.cycle(HELDOUT_COMBOS), itertools.cycle(seen)
    return [(*next(held_out if i % 4 == 0 else others), list(BACKGROUNDS)[i % 3]) for i in range(n)]


def real_attributes(specs, seed=1):
    """Attributes of real videos for these specs. Start and radius come from the next shapes-world
    video with the same motion (the motion alone decides where a shape may start); the colour and
    shape are then swapped in."""
    world = ShapesDataset(seed=seed)
    drawn = (world.attributes(i)["shapes"][0] for i in itertools.count())
    return [{"background": background,
             "shapes": [{**next(s for s in drawn if s["motion"] == motion), "color": color, "shape": shape}]}
            for color, shape, motion, background in specs]


def accuracy(predictions, truth):
    """-> [colour, shape, motion] accuracy."""
    return [float(np.mean([p[k] == t[k] for p, t in zip(predictions, truth)])) for k in range(3)]


@torch.no_grad()
def evaluate_shapes(pipe, n, steps, cfg_content, cfg_motion, generator, autocast, device, batch_size=16):
    """Generate n shapes videos from captions, detect their attributes; the same for real videos of
    the same attributes and for their AE reconstructions (the best the generator could do)."""
    specs = eval_specs(n)
    attributes = real_attributes(specs)
    prompts = [caption_for(a) for a in attributes]
    a = pipe.ae.config
    size = a.height * (8 if a.sd else 1)  # pixels (the SD VAE downsamples by 8)
    found = {"generated": [], "ae": [], "real": []}
    for i in tqdm(range(0, n, batch_size), desc=f"eval ({batch_size} videos a batch)"):
        real = np.stack([render_shapes(x, size, a.frames) for x in attributes[i:i + batch_size]])
        with autocast:
            generated, _ = pipe(prompts[i:i + batch_size], steps, cfg_content, cfg_motion, generator, progress=False)
            frames = pipe.frame_space.encode(uint8_to_video(real).to(device))
            reconstructed = pipe.frame_space.decode(pipe.ae.decode(*pipe.ae.encode(frames)))
        found["generated"] += [detect(v) for v in video_to_uint8(generated)]
        found["ae"] += [detect(v) for v in video_to_uint8(reconstructed)]
        found["real"] += [detect(v) for v in real]
    held_out = [i for i, s in enumerate(specs) if s[:3] in HELDOUT_COMBOS]
    rows = [("generated", "", found["generated"], specs),
            ("generated, held-out combos", "heldout_", [found["generated"][i] for i in held_out],
             [specs[i] for i in held_out]),
            ("AE reconstructions", "ae_", found["ae"], specs), ("real videos", "real_", found["real"], specs)]
    summary = {"n": n, "heldout_n": len(held_out), "steps": steps, "cfg_content": cfg_content, "cfg_motion": cfg_motion}
    print("| videos | n | color | shape | motion |\n|---|---|---|---|---|")
    for name, prefix, predictions, truth in rows:
        scores = accuracy(predictions, truth)
        print(f"| {name} | {len(truth)} | " + " | ".join(f"{x:.3f}" for x in scores) + " |")
        summary.update({f"{prefix}{k}_acc": x for k, x in zip(("color", "shape", "motion"), scores)})
    return summary


# ----------------------------------------------------------------------------- efficiency benchmark
# The cost tables of CMD's Section 5 (Tables 8 and 9) at the paper's scale, reproduced on the
# same work for CMD, ModelScope's text-to-video architecture and frame-by-frame Stable
# Diffusion: python sample.py --bench [--compile].
#
# Two ways to count, because the paper counts differently from us:
#   * FLOPs: PyTorch's FlopCounterMode (data.count_flops) on the `meta` device, so full-size
#     models cost no memory. A multiply-add is 2 FLOPs; matmuls, convolutions and attention
#     are counted, elementwise ops and norms are not. Classifier-free guidance runs the
#     denoiser on a batch of 2 (conditional + unconditional), and we count that batch.
#   * The paper's convention (fvcore): multiply-adds (= FLOPs / 2) of one forward pass. Its
#     numbers are matched by our counts at batch 1 (one guidance branch) without the two
#     attention matmuls (QK^T and PV) and, for sampling, without the SD decoder (Table 9
#     leaves it out). fvcore has no handler for memory-efficient attention kernels and skips
#     them, which would explain the missing attention: that part is our inference, the match
#     of the numbers is not.

# Stable Diffusion 2.1's VAE (vae/config.json of stabilityai/stable-diffusion-2-1). Its decoder
# turns each generated 4 x 64 x 128 latent frame into 3 x 512 x 1024 pixels, in all three systems
# (ModelScope's VAE has the same architecture).
SD21_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=768, scaling_factor=0.18215,
)

# ModelScope text-to-video (Wang et al. 2023), the paper's main baseline: unet/config.json of
# damo-vilab/text-to-video-ms-1.7b. SD's UNet widths plus temporal convolutions and temporal
# attention in every block; 1.41 B parameters, denoising all 16 frames jointly.
MODELSCOPE_UNET_CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4,
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, norm_num_groups=32, norm_eps=1e-5,
    down_block_types=("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",),
    up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3,
    attention_head_dim=64,  # here it is the width of a head (64 x 5 = 320, ...)
    cross_attention_dim=1024,  # OpenCLIP ViT-H/14 text, as SD 2.x
)

# The work of the paper's two efficiency tables. Frames are SD latents: 512x1024 video ->
# 64x128 latents (sampling, Table 9); 512x512 -> 64x64 (training, Table 8). The AE preset's
# shapes, and the motion DiT's, are re-derived for each size (shapes_at).
PAPER_SETUP = dict(
    unet=SD21_UNET_CONFIG, unet3d=MODELSCOPE_UNET_CONFIG, vae=SD21_VAE_CONFIG,
    ae=AE_PRESETS["paper"], motion=MOTION_PRESETS["paper"],
    sample_latent=(64, 128), train_latent=(64, 64), steps=50, text_len=77, cfg_scale=7.5,
)

# The paper's own numbers [TFLOPs as fvcore multiply-adds, seconds, GB]. Table 9: sampling one
# 16 x 512 x 1024 video, 50 DDIM steps, A100 40GB, fp16, SD decoder excluded. Table 8: one
# training step on 16 x 512 x 512 videos, batch 1, A100 80GB, mixed precision.
PAPER_SAMPLING = {"CMD": (46.8, 3.13, 5.56), "ModelScope": (939.0, 35.1, 8.50)}
PAPER_TRAINING = {"CMD autoencoder": (0.77, 0.109, 8.93), "CMD content-frame diffusion": (0.34, 0.151, 21.5),
                  "CMD motion diffusion": (0.14, 0.100, 18.7), "ModelScope": (9.41, 0.920, 69.6)}
# name -> (the networks it runs, its key in the JSON line)
SYSTEMS = {"CMD": (("unet", "dit", "ae", "vae"), "cmd"), "ModelScope": (("unet3d", "vae"), "modelscope"),
           "frame-wise SD": (("unet", "vae"), "framewise")}
TRAINING = {"CMD autoencoder": ("ae", "train_ae"), "CMD content-frame diffusion": ("unet", "train_content"),
            "CMD motion diffusion": ("dit", "train_motion"), "ModelScope": ("unet3d", "train_modelscope")}


def count_flops_and_attention(fn):
    """(all FLOPs, attention FLOPs) of fn(), as FlopCounterMode counts them (data.count_flops).
    On `meta`, scaled_dot_product_attention runs in its math form, two batched matmuls (QK^T,
    then PV), and no other layer of these models uses bmm: the bmm share is the attention's."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops(), counter.get_flop_counts()["Global"].get(torch.ops.aten.bmm, 0)


def shapes_at(setup, latent_size):
    """(AEConfig, MotionConfig) for frames of latent_size (h, w): the AE's token grid sets the
    motion latent's (H' + W') tokens, as motion.config_for does for a trained AE."""
    h, w = latent_size
    ae = replace(setup["ae"], height=h, width=w)
    motion = replace(setup["motion"], frames=ae.frames, latent_h=h // ae.patch, latent_w=w // ae.patch,
                     latent_dim=ae.motion_dim, frame_channels=ae.channels, frame_height=h, frame_width=w)
    return ae, motion


def build(setup, names, latent_size, device, dtype=torch.float32):
    """Random-weight networks by name, built straight on `device` ("meta": shapes only)."""
    ae, motion = shapes_at(setup, latent_size)
    make = {"unet": lambda: UNet2DConditionModel(**setup["unet"]),
            "unet3d": lambda: UNet3DConditionModel(**setup["unet3d"]),
            "vae": lambda: AutoencoderKL(**setup["vae"]),
            "ae": lambda: Autoencoder(ae),
            "dit": lambda: MotionDiT(motion)}
    with torch.device(device):
        nets = {name: make[name]().eval().requires_grad_(False) for name in names}
    # nn.Module.to, not diffusers' override: diffusers 0.42 warns on every dtype cast, even with
    # no float32-only modules to keep.
    return {name: torch.nn.Module.to(net, dtype) for name, net in nets.items()}


def modelscope_model_fn(unet3d):
    """The 3D UNet as a Diffusion model_fn(x, t, cond): x is a whole video (b, c, l, h, w)."""
    return lambda x, t, tokens: unet3d(x, t, encoder_hidden_states=tokens).sample


# ----------------------------------------------------------------------------- benchmark: sampling (Table 9)
# One 16-frame 512x1024 video, 50 DDIM steps with guidance.

@dataclass
class Part:
    """One network's share of a sampling run."""
    name: str
    calls: int       # forwards per video: DDIM steps, or frames for the SD decoder
    flops: int       # FLOPs of one call
    attention: int   # ... of which the attention matmuls
    cfg: int = 1     # 2 where one call carries both guidance branches
    sd_decode: bool = False

    @property
    def tflops(self):
        return self.calls * self.flops / 1e12

    @property
    def paper_tmacs(self):
        """The paper's convention: multiply-adds, one guidance branch, no attention, no SD decoder."""
        return 0.0 if self.sd_decode else self.calls * (self.flops - self.attention) / self.cfg / 2 / 1e12


def sampling_flops(setup):
    """{system: [Part]} for sampling one video, counted on `meta`. Each network's forward is
    counted once, at the batch the sampler runs it, and multiplied by the number of DDIM
    steps: every step costs the same, and the DDIM update (elementwise) counts as 0."""
    nets = build(setup, ("unet", "unet3d", "vae", "ae", "dit"), setup["sample_latent"], "meta")
    a = nets["ae"].config
    L, C, H, W = a.frames, a.channels, a.height, a.width
    steps = setup["steps"]
    count = count_flops_and_attention
    with torch.device("meta"), torch.no_grad():
        t = torch.zeros(2 * L)
        tokens = torch.empty(2 * L, setup["text_len"], setup["unet"]["cross_attention_dim"])
        content_frame = torch.empty(1, C, H, W)
        motion_latent = torch.empty(1, L, (H + W) // a.patch, a.motion_dim)  # (b, L, H' + W', D)
        unet = count(lambda: nets["unet"](torch.empty(2, C, H, W), t[:2], encoder_hidden_states=tokens[:2]))
        frames = count(lambda: nets["unet"](torch.empty(2 * L, C, H, W), t, encoder_hidden_states=tokens))
        unet3d = count(lambda: nets["unet3d"](torch.empty(2, C, L, H, W), t[:2], encoder_hidden_states=tokens[:2]))
        dit = count(lambda: nets["dit"](*example_inputs(nets["dit"].config, 2, setup["text_len"], "meta")))
        ae_decoder = count(lambda: nets["ae"].decode(content_frame, motion_latent))
        vae = count(lambda: nets["vae"].decode(content_frame))  # one frame at a time, as FrameSpace decodes
    decode = Part(f"SD VAE decoder, {L} frames one by one", L, *vae, sd_decode=True)
    return {"CMD": [Part("content UNet (SD 2.1), CFG batch 2", steps, *unet, cfg=2),
                    Part("motion DiT, CFG batch 2", steps, *dit, cfg=2),
                    Part("AE decoder, batch 1", 1, *ae_decoder), decode],
            "ModelScope": [Part(f"3D UNet on {L} frames, CFG batch 2", steps, *unet3d, cfg=2), decode],
            "frame-wise SD": [Part(f"SD 2.1 UNet on {L} frames, CFG batch 2 x {L}", steps, *frames, cfg=2), decode]}


def random_text(setup, device, dtype):
    """Stand-ins for the text features of a prompt and of "" (the unconditional prompt). The
    text encoder runs once per video (~0.05 TFLOPs for ViT-H/14) and is left out, as in the paper."""
    m, width = setup["motion"], setup["unet"]["cross_attention_dim"]
    tokens = lambda dim: torch.randn(1, setup["text_len"], dim, device=device, dtype=dtype)
    pooled = lambda: torch.randn(1, m.pooled_dim, device=device, dtype=dtype)
    return dict(unet=tokens(width), unet_uncond=tokens(width),
                dit=(tokens(m.text_dim), pooled()), dit_uncond=(tokens(m.text_dim), pooled()))


def sd_decode(vae, frames):
    """SD latents (1, L, C, H, W) -> pixels (1, L, 3, 8H, 8W) through ae.FrameSpace's decoder."""
    frame_space = FrameSpace()
    frame_space.vae = vae  # the SD VAE with random weights, in place of a download
    return frame_space.decode(frames)


@torch.no_grad()
def sample_video(system, nets, text, setup):
    """One video by `system`, through the real samplers (content.Diffusion's DDIM, guidance on
    the batched pair): (1, L, 3, 8H, 8W) pixels."""
    diffusion = Diffusion(prediction_type="v_prediction")
    ddim = dict(steps=setup["steps"], cfg_scale=setup["cfg_scale"], progress=False)
    L, C, H, W = setup["ae"].frames, setup["ae"].channels, *setup["sample_latent"]
    if system == "CMD":  # the paper's Algorithm 1: content frame, then its motion, then the AE decoder
        content_frame = diffusion.ddim_sample(unet_model_fn(nets["unet"]), (1, C, H, W),
                                              text["unet"], text["unet_uncond"], **ddim)
        m = nets["dit"].config
        motion_latent = diffusion.ddim_sample(
            dit_model_fn(nets["dit"]), (1, L, m.latent_h + m.latent_w, m.latent_dim),
            (content_frame, *text["dit"]), (content_frame, *text["dit_uncond"]), **ddim)  # both branches see x̄
        frames = nets["ae"].decode(content_frame, motion_latent)
    elif system == "ModelScope":  # all frames denoised jointly
        video = diffusion.ddim_sample(modelscope_model_fn(nets["unet3d"]), (1, C, L, H, W),
                                      text["unet"], text["unet_uncond"], **ddim)
        frames = rearrange(video, "b c l h w -> b l c h w")
    else:  # frame-wise SD: the frames as a batch of independent images with the same prompt
        frames = diffusion.ddim_sample(unet_model_fn(nets["unet"]), (L, C, H, W), text["unet"].expand(L, -1, -1),
                                       text["unet_uncond"].expand(L, -1, -1), **ddim)[None]
    return sd_decode(nets["vae"], frames)


# ----------------------------------------------------------------------------- benchmark: training (Table 8)
# One training step on 16-frame 512x512 videos, batch 1.

def training_case(name, setup, device):
    """(model, loss()) of one training step of `name`: the loss each stage trains with (ae.py,
    content.py, motion.py), on random inputs of the right shapes."""
    model_name = TRAINING[name][0]
    model = build(setup, [model_name], setup["train_latent"], device)[model_name].train().requires_grad_(True)
    diffusion = Diffusion(prediction_type="v_prediction")
    a, m = shapes_at(setup, setup["train_latent"])
    with torch.device(device):
        frames = torch.randn(1, a.frames, a.channels, a.height, a.width)  # (b, L, C, H, W) SD latents
        content_frame = torch.randn(1, a.channels, a.height, a.width)
        tokens = torch.randn(1, setup["text_len"], setup["unet"]["cross_attention_dim"])
        _, _, _, dit_tokens, dit_pooled = example_inputs(m, 1, setup["text_len"])
        motion_latent = torch.rand(1, m.frames, m.latent_h + m.latent_w, m.latent_dim) * 2 - 1
    if model_name == "ae":
        return model, lambda: F.mse_loss(model(frames), frames)
    if model_name == "unet":
        return model, lambda: diffusion.loss(unet_model_fn(model), content_frame, tokens)
    if model_name == "dit":
        cond = (content_frame, dit_tokens, dit_pooled)
        return model, lambda: diffusion.loss(dit_model_fn(model), motion_latent, cond)
    video = rearrange(frames, "b l c h w -> b c l h w")
    return model, lambda: diffusion.loss(modelscope_model_fn(model), video, tokens)


def training_flops(setup):
    """{name: (FLOPs of a training step = forward + backward, forward FLOPs, their attention share)},
    counted on `meta`."""
    costs = {}
    for name in TRAINING:
        model, loss = training_case(name, setup, "meta")
        step, _ = count_flops_and_attention(lambda: loss().backward())
        costs[name] = (step, *count_flops_and_attention(loss))
    return costs


# ----------------------------------------------------------------------------- benchmark: time and memory
# Wall clock and peak memory, on a GPU.

def measure(fn, device, runs):
    """(median seconds, peak GB) of fn() after one warm-up call (cuDNN autotuning, the caching
    allocator, torch.compile). The GPU is synchronised only around each whole call."""
    fn()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)  # the peak restarts from what is held now: the weights
    seconds = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), torch.cuda.max_memory_allocated(device) / 1e9


def sampling_on_gpu(setup, device, runs, compile_models=False):
    """{system: (seconds, peak GB)} of sampling one video, bf16 weights, plus "SD decode" alone.
    Autocast turns the few fp32 tensors (the DDIM state, timestep features) into bf16 on the fly."""
    text = random_text(setup, device, torch.bfloat16)
    results = {}
    for system, (names, _) in SYSTEMS.items():
        nets = build(setup, names, setup["sample_latent"], device, torch.bfloat16)
        if compile_models:  # the denoisers: the 50-step loops are where the time goes
            nets.update({k: torch.compile(v) for k, v in nets.items() if k in ("unet", "dit", "unet3d")})
        with torch.autocast(device.type, dtype=torch.bfloat16):
            results[system] = measure(lambda: sample_video(system, nets, text, setup), device, runs)
            if system == "CMD":
                a = setup["ae"]
                latents = torch.randn(1, a.frames, a.channels, *setup["sample_latent"], device=device)
                results["SD decode"] = measure(lambda: sd_decode(nets["vae"], latents), device, runs)
        del nets
        torch.cuda.empty_cache()
    return results


def training_on_gpu(setup, device, runs):
    """{name: (seconds per step, peak GB) or None if out of memory}: data.train's step, bf16
    autocast on fp32 weights, backward, AdamW (its EMA update left out, as in the paper's baselines)."""
    results = {}
    for name in TRAINING:
        model, loss = training_case(name, setup, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                value = loss()
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()

        try:
            results[name] = measure(step, device, runs)
        except torch.cuda.OutOfMemoryError:
            results[name] = None
        del model, loss, opt, step  # step holds the others: all must go for the memory to be freed
        torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- benchmark: the tables

def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows])


def significant(x):
    return float(f"{x:.4g}")


def print_flops(sampling, training, setup):
    """The FLOPs tables, ours next to the paper's; returns their numbers for the JSON line."""
    L, (H, W), (h, w) = setup["ae"].frames, setup["sample_latent"], setup["train_latent"]
    result = {}
    print(f"## Sampling one {L}-frame {8 * H}x{8 * W} video: {setup['steps']} DDIM steps with CFG, batch 1\n")
    print("TFLOPs: FlopCounterMode on `meta`, 2 FLOPs per multiply-add, attention included, the CFG pair counted "
          "as the batch of 2 it runs as; each forward counted once and multiplied by its calls.\n")
    print(markdown(["system", "network", "calls", "TFLOPs per call", "TFLOPs"],
                   [(system, p.name, p.calls, f"{p.flops / 1e12:.3f}", f"{p.tflops:.1f}")
                    for system, parts in sampling.items() for p in parts]) + "\n")
    rows = []
    for system, parts in sampling.items():
        total = sum(p.tflops for p in parts)
        no_decode = sum(p.tflops for p in parts if not p.sd_decode)
        paper_convention = sum(p.paper_tmacs for p in parts)
        rows.append((system, f"{total:.1f}", f"{no_decode:.1f}", f"{no_decode / 2:.1f}", f"{paper_convention:.1f}",
                     PAPER_SAMPLING.get(system, ("-",))[0]))
        k = SYSTEMS[system][1]
        result.update({f"{k}_tflops": total, f"{k}_tflops_no_sd_decode": no_decode,
                       f"{k}_paper_convention_tmacs": paper_convention})
    print(markdown(["system", "TFLOPs", "TFLOPs w/o SD decode", "TMACs w/o SD decode (= TFLOPs / 2)",
                    "TMACs, paper's convention", "paper, Table 9 (fvcore TMACs)"], rows))
    print("\nPaper's convention: multiply-adds of one guidance branch, without the attention matmuls "
          "and the SD decoder.\n")

    print(f"## One training step on {L}-frame {8 * h}x{8 * w} videos ({h}x{w} latents), batch 1\n")
    rows = []
    for name, (step, forward, attention) in training.items():
        paper_convention = (forward - attention) / 2e12
        rows.append((name, f"{step / 1e12:.2f}", f"{forward / 1e12:.2f}", f"{forward / 2e12:.2f}",
                     f"{paper_convention:.2f}", PAPER_TRAINING[name][0]))
        k = TRAINING[name][1]
        result.update({f"{k}_tflops": step / 1e12, f"{k}_paper_convention_tmacs": paper_convention})
    print(markdown(["model", "TFLOPs per step (forward + backward)", "forward TFLOPs", "forward TMACs (= / 2)",
                    "forward TMACs w/o attention (paper's convention)", "paper, Table 8 (fvcore TMACs)"], rows))

    result.update(sampling_flops_ratio=result["modelscope_tflops"] / result["cmd_tflops"],
                  sampling_paper_convention_ratio=(result["modelscope_paper_convention_tmacs"]
                                                   / result["cmd_paper_convention_tmacs"]),
                  training_flops_ratio=result["train_modelscope_tflops"] / result["train_ae_tflops"])
    print(f"\nModelScope / CMD: sampling {result['sampling_flops_ratio']:.1f}x the FLOPs "
          f"({result['sampling_paper_convention_ratio']:.1f}x in the paper's convention; paper: 939.0 / 46.8 = 20.1x); "
          f"training {result['training_flops_ratio']:.1f}x the FLOPs per step of CMD's costliest part, the AE "
          f"(paper: 9.41 / 0.77 = 12.2x).\n")
    return result


def print_gpu(setup, device, runs, compile_models):
    """Time and peak memory of sampling and of training steps; returns their numbers."""
    result = {"device": torch.cuda.get_device_name(device)}
    print(f"## Time and memory on {result['device']}: bf16, median of {runs} runs after a warm-up"
          f"{', torch.compile' if compile_models else ''}; peak = torch.cuda.max_memory_allocated, weights included\n")
    timed = sampling_on_gpu(setup, device, runs, compile_models)
    decode_seconds = timed.pop("SD decode")[0]
    result["sd_decode_seconds"] = decode_seconds
    rows = []
    for system, (seconds, peak) in timed.items():
        paper = PAPER_SAMPLING.get(system, ("-", "-", "-"))
        rows.append((system, f"{seconds:.2f}", f"{seconds - decode_seconds:.2f}", f"{peak:.2f}", paper[1], paper[2]))
        result.update({f"{SYSTEMS[system][1]}_seconds": seconds, f"{SYSTEMS[system][1]}_peak_gb": peak})
    print(markdown(["sampling", "seconds", "seconds w/o SD decode", "peak GB",
                    "paper s (A100, fp16, w/o SD decode)", "paper GB"], rows))
    rows = []
    for name, measured in training_on_gpu(setup, device, runs).items():
        paper = PAPER_TRAINING[name]
        if measured is None:
            rows.append((name, "out of memory", "-", paper[1], paper[2]))
            continue
        seconds, peak = measured
        rows.append((name, f"{seconds:.3f}", f"{peak:.1f}", paper[1], paper[2]))
        result.update({f"{TRAINING[name][1]}_seconds": seconds, f"{TRAINING[name][1]}_peak_gb": peak})
    print("\n" + markdown(["training step", "seconds", "peak GB", "paper s (A100)", "paper GB"], rows))
    return result


def bench(device, setup=PAPER_SETUP, runs=3, compile_models=False):
    """Print the paper's two efficiency tables next to ours and return ours as a dict, also
    printed as the last line (JSON). FLOPs always (on `meta`); seconds and memory on a GPU."""
    start = time.perf_counter()
    sampling, training = sampling_flops(setup), training_flops(setup)
    flops_seconds = time.perf_counter() - start
    result = print_flops(sampling, training, setup)
    print(f"FLOPs counted in {flops_seconds:.1f} s.\n")
    result["flops_seconds"] = flops_seconds
    if device.type == "cuda":
        result.update(print_gpu(setup, device, runs, compile_models))
    else:
        print("No GPU: seconds and memory need one (python sample.py --bench on a CUDA machine).")
    result = {k: significant(v) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- command line

def fail(message):
    """A user's mistake: one line on stderr, exit status 2, no traceback."""
    print(f"sample.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def read_prompts(args):
    if args.prompts:
        try:
            prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            fail(f"cannot read --prompts {args.prompts}: {e}")
        if not prompts:
            fail(f"--prompts {args.prompts} holds no prompts: write one prompt a line")
        return prompts
    if not args.prompt.strip():
        fail('the prompt is blank: describe the video, e.g. "a red circle moving left on a dark background"')
    return [args.prompt.strip()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="what the video shows")
    parser.add_argument("--prompts", help="a text file, one prompt a line")
    parser.add_argument("--eval-shapes", type=int, metavar="N", help="score N generated shapes videos, write nothing")
    parser.add_argument("--bench", action="store_true", help="print the paper-scale cost tables (Tables 8, 9), exit")
    parser.add_argument("--compile", action="store_true", help="--bench: time the denoisers under torch.compile")
    parser.add_argument("--run", default=None, help=f"run directory of all three stages (default: {DEFAULT_RUN})")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps of each stage (default 50; eval 25)")
    parser.add_argument("--cfg-content", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--cfg-motion", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num", type=int, default=1, help="videos per prompt, in one batch")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--format", default="both", choices=("mp4", "gif", "both"))
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="autocast precision (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.prompt, args.prompts, args.eval_shapes)) + args.bench != 1:
        parser.error("give exactly one of: a prompt, --prompts FILE, --eval-shapes N, --bench")
    if args.compile and not args.bench:
        parser.error("--compile goes with --bench")
    if args.num < 1 or any(x is not None and x < 1 for x in (args.steps, args.eval_shapes)):
        parser.error("--num, --steps and --eval-shapes want positive numbers")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu")
    if args.bench:  # random weights at the paper's sizes: no prompt, no checkpoint
        bench(device, runs=3, compile_models=args.compile)
        return
    prompts = None if args.eval_shapes else read_prompts(args)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    run_dir = Path(args.run) if args.run else DEFAULT_RUN
    if args.run is None and not run_dir.is_dir():
        fail(f"the default checkpoint {run_dir} is missing; train it with: {HOW_TO_TRAIN.format(run_dir)} "
             "(or pass --run DIR)")
    out = Path(args.out)
    if not args.eval_shapes:
        try:  # find out now, not after loading and sampling, that the folder cannot be written
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as e:
            fail(f"cannot write to --out {out} ({e.strerror or e}): pick a folder you can write to")
    try:
        pipe = Pipeline(run_dir, device)
    except (OSError, RuntimeError, ValueError) as e:  # missing or unreadable, half-written, mixed presets
        fail(" ".join(str(e).split()))  # state_dict errors span lines
    cfg_content = args.cfg_content if args.cfg_content is not None else pipe.content_config.cfg_scale
    cfg_motion = args.cfg_motion if args.cfg_motion is not None else pipe.motion_config["cfg_scale"]
    if args.eval_shapes:
        steps = args.steps or 25  # 25, not 50: --eval-shapes 200 then takes minutes on a CPU
        start = time.time()
        summary = evaluate_shapes(pipe, args.eval_shapes, steps, cfg_content, cfg_motion,
                                  torch.Generator(device).manual_seed(args.seed), autocast, device)
        print(json.dumps({**summary, "seconds": round(time.time() - start, 1)}))  # the last line of stdout
        return
    formats = {"mp4": [".mp4"], "gif": [".gif"], "both": [".mp4", ".gif"]}[args.format]
    for prompt in prompts:
        # One generator per prompt, seeded alike: a prompt gives the same videos wherever it is in the file.
        generator = torch.Generator(device).manual_seed(args.seed)
        with autocast:
            videos, content_images = pipe([prompt] * args.num, args.steps or 50, cfg_content, cfg_motion, generator)
        save(videos, content_images, out / f"{slug(prompt)}-{args.seed}", formats, args.fps)


if __name__ == "__main__":
    main()

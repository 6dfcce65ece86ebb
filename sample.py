"""Stage 4 of CMD: sampling, text -> video (arXiv 2403.14148, Algorithm 1 in App. E).

`generate` below is the paper's Algorithm 1 in five numbered steps: text features, the content
frame by guided DDIM on the content UNet (content.py; the paper: 50 steps, eta = 0, App. B.4), the
motion latent by guided DDIM on the motion DiT given that content frame (motion.py), the AE decoder
(ae.py), and the SD VAE decoder to pixels (paper preset). The rest of the file writes
<out>/<prompt>-<seed>.mp4 / .gif and the content frame as .png. Measuring the method lives in tools/:
evaluate.py (FVD, CLIPSIM, the shapes world) and bench.py.

All three stages load from one run directory (ae.*, content.*, motion.*, text_encoder.*).
With no --run, the tiny shapes checkpoint shipped with the repo (checkpoints/shapes-tiny).

    python sample.py "a red circle moving left on a dark background"
    python sample.py "a blue square growing on a light background" --run runs/tiny --num 4 --seed 1
    python sample.py --prompts prompts.txt --format gif     # one prompt a line
    python sample.py "a green square moving up" --image picture.png          # image-to-video
    python sample.py "a green triangle moving left" --motion-from clip.mp4   # motion transfer
    python sample.py "a corgi running on the beach" --run runs/paper --device cuda   # paper scale, bf16
    python sample.py "ApplyEyeMakeup" --run runs/ucf --device cuda   # a UCF-101 class (or "apply eye makeup")
"""
import argparse
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ae import Autoencoder, FrameSpace, load_ae
from content import Diffusion, TextEncoder, check_unet_fits, load_content, sample_content_frames
from data import (fail, parse_resolution, read_video, resize_cover, uint8_to_video, video_to_uint8, write_image,
                  write_video)
from motion import MotionDiT, check_dit_fits, load_motion, sample_motion

DEFAULT_RUN = Path(__file__).parent / "checkpoints" / "shapes-tiny"


@dataclass
class Models:
    """The trained networks of one run, and how it samples by default: guidance scales, DDIM steps."""
    text_encoder: TextEncoder
    unet: torch.nn.Module          # content UNet (SD's, or the tiny one)
    content_diffusion: Diffusion
    dit: MotionDiT
    motion_diffusion: Diffusion
    ae: Autoencoder
    frame_space: FrameSpace        # pixels, or the SD VAE
    cfg_content: float
    cfg_motion: float
    content_steps: int
    motion_steps: int


@torch.no_grad()
def generate(models, prompts, content_steps=None, motion_steps=None, cfg_content=None, cfg_motion=None,
             generator=None, progress=True, content_frame=None, motion_latent=None, cuda_graphs=True):
    """Algorithm 1: prompts -> (videos (B, L, 3, H, W), content frames (B, 3, H, W)), pixels in [-1, 1].
    Steps and guidance default to the run's (Models); on a GPU each stage's DDIM replays a CUDA graph.

    The decomposition lets either half come from elsewhere: a given content frame (1, C, H, W), e.g.
    a picture (image-to-video), skips step 2; a given motion latent (1, L, H' + W', D), e.g. another
    video's (motion transfer), skips step 3."""
    n = len(prompts)
    content_steps, motion_steps = content_steps or models.content_steps, motion_steps or models.motion_steps
    cfg_content = models.cfg_content if cfg_content is None else cfg_content
    cfg_motion = models.cfg_motion if cfg_motion is None else cfg_motion
    ae_config, dit_config = models.ae.config, models.dit.config
    content_shape = (n, ae_config.channels, ae_config.height, ae_config.width)  # x̄: (n, C, H, W)
    motion_shape = (n, dit_config.frames, dit_config.latent_h + dit_config.latent_w, dit_config.latent_dim)  # z
    # 1. text features: tokens (n, context, width) for the UNet and the DiT, pooled (n, embed_dim) for the DiT;
    #    those of "" for the unconditional branch of classifier-free guidance
    text, null_text = models.text_encoder(prompts), models.text_encoder([""] * n)
    # 2. content frame x̄_0 from x̄_T ~ N(0, I): guided DDIM on the content UNet (content.py)
    if content_frame is None:
        content_frame = sample_content_frames(models.unet, models.content_diffusion, text[0], null_text[0],
                                              content_shape[1:], content_steps, cfg_content, generator, progress,
                                              cuda_graphs)
    content_frame = content_frame.expand(content_shape)
    # 3. motion latent z_0 (n, L, H' + W', D) from z_T ~ N(0, I): guided DDIM on the DiT, given x̄_0 (motion.py)
    if motion_latent is None:
        motion_latent = sample_motion(models.dit, models.motion_diffusion, content_frame, text, null_text,
                                      motion_steps, cfg_motion, generator, progress, cuda_graphs)
    motion_latent = motion_latent.expand(motion_shape)
    # 4. the AE decoder: x = g(x̄_0, z_0), 16 frames in frame space
    frames = models.ae.decode(content_frame, motion_latent)
    # 5. frame space -> pixels (SD VAE decoder, frame by frame; identity for pixel frames)
    return models.frame_space.decode(frames), models.frame_space.decode(content_frame[:, None])[:, 0]


def load_models(run_dir, device="cpu", resolution=None):
    """The three trained stages of one run directory, checked to fit together. With `resolution`
    (height, width) they make videos of that size instead of the size they were trained at (the
    UNet is convolutional; the AE's and DiT's positions are sin-cos functions of their grids)."""
    ae, frame_space = load_ae(run_dir, device, resolution)
    text_encoder, unet, content_diffusion, content_config = load_content(run_dir, device)
    dit, motion_diffusion = load_motion(run_dir, device, ae.config if resolution else None)
    try:  # stages of different presets load fine, and would fail later with a shape error
        check_unet_fits(unet.config, "its content UNet takes", ae.config.channels, text_encoder.width)
        check_dit_fits(dit.config, ae.config, (text_encoder.width, text_encoder.embed_dim))
    except ValueError as e:
        raise ValueError(f"{run_dir} mixes stages of different presets ({e}): train all three with the same "
                         "--preset into one --out") from e
    return Models(text_encoder, unet, content_diffusion, dit, motion_diffusion, ae, frame_space,
                  content_config.cfg_scale, dit.config.cfg_scale, content_config.sample_steps, dit.config.sample_steps)


@torch.no_grad()
def content_frame_of_image(models, path, device):
    """A picture -> its content frame (1, C, H, W): resized to cover the video size and centre-cropped
    as training clips are, then through the SD VAE (paper preset); a pixel frame as it is (tiny)."""
    try:
        image = np.asarray(Image.open(path).convert("RGB"))
    except (OSError, ValueError) as e:  # missing, not an image, truncated
        raise ValueError(f"cannot read --image {path}: {e}") from e
    frame = resize_cover(uint8_to_video(image[None]), models.ae.config.video_size)  # (1, 3, H, W)
    return models.frame_space.encode(frame[None].to(device))[:, 0]


@torch.no_grad()
def motion_latent_of_video(models, path, device):
    """A clip's first L frames -> their motion latent (1, L, H' + W', D), by the AE's encoder."""
    clip = read_video(path, models.ae.config.frames)  # VideoError if unreadable or too short
    video = resize_cover(uint8_to_video(clip), models.ae.config.video_size)[None].to(device)
    return models.ae.encode(models.frame_space.encode(video))[1]


# ----------------------------------------------------------------------------- files and command line

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


def load_run(run, device, resolution=None, compile_denoisers=False):
    """--run (or the shipped checkpoint) -> Models, or a one-line error that says what to do."""
    run_dir = Path(run) if run else DEFAULT_RUN
    if run is None and not run_dir.is_dir():
        fail(f"the default checkpoint {run_dir} is missing; train it with: python ae.py --out {run_dir} && python "
             f"content.py --out {run_dir} && python motion.py --out {run_dir} (or pass --run DIR)")
    try:
        models = load_models(run_dir, device, resolution)
    except (OSError, RuntimeError, ValueError) as e:  # missing or unreadable, half-written, mixed presets
        fail(e)
    if compile_denoisers:  # each DDIM step still replays a CUDA graph, now of the compiled kernels
        models.unet, models.dit = torch.compile(models.unet), torch.compile(models.dit)
    return models


def autocast_for(device, dtype_name):
    """bf16 autocast on CUDA unless --dtype says otherwise; float32 (no autocast) on the CPU."""
    dtype = getattr(torch, dtype_name or ("bfloat16" if device.type == "cuda" else "float32"))
    # no cache of cast weights: a CUDA graph (content.cuda_graphed) records the casts with the rest
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


def add_sampling_args(parser):
    """The flags that say how to sample a run; tools/evaluate.py shares them."""
    parser.add_argument("--run", default=None, help=f"run directory of all three stages (default: {DEFAULT_RUN})")
    parser.add_argument("--steps", type=int, help="DDIM steps of both stages (default: the run's)")
    parser.add_argument("--content-steps", type=int, help="DDIM steps of the content frame (default: --steps)")
    parser.add_argument("--motion-steps", type=int, help="DDIM steps of the motion latent (default: --steps)")
    parser.add_argument("--cfg-content", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--cfg-motion", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--resolution", type=parse_resolution, default=None,
                        help="HEIGHTxWIDTH of the videos in pixels (default: the size the run was trained at)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="autocast precision (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet and the DiT (on a GPU: the "
                                                               "first video compiles, the rest sample faster)")


def steps_of(args):
    """(content steps, motion steps) of the command line, None for the run's own."""
    return args.content_steps or args.steps, args.motion_steps or args.steps


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="?", help="what the video shows")
    parser.add_argument("--prompts", help="a text file, one prompt a line")
    add_sampling_args(parser)
    parser.add_argument("--image", help="image-to-video: this picture is the content frame; only the motion is sampled")
    parser.add_argument("--motion-from", metavar="VIDEO", help="motion transfer: the motion latent of this clip's "
                                                               "first frames, a new content frame from the prompt")
    parser.add_argument("--num", type=int, default=1, help="videos per prompt, in one batch")
    parser.add_argument("--out", default="samples", help="output folder")
    parser.add_argument("--format", default="both", choices=("mp4", "gif", "both"))
    parser.add_argument("--fps", type=float, default=8)
    args = parser.parse_args(argv)
    if (args.prompt is None) == (args.prompts is None):
        parser.error("give a prompt or --prompts FILE")
    if any(value is not None and value < 1 for value in (args.num, args.steps, args.content_steps, args.motion_steps)):
        parser.error("--num and the steps want positive numbers")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu")
    prompts = read_prompts(args)
    out = Path(args.out)
    try:  # find out now, not after loading and sampling, that the folder cannot be written
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as e:
        fail(f"cannot write to --out {out} ({e.strerror or e}): pick a folder you can write to")
    models = load_run(args.run, device, args.resolution, args.compile)
    try:
        models.text_encoder(prompts)  # a prompt this run cannot read (a word or class it never saw) fails here
        given = {"content_frame": args.image and content_frame_of_image(models, args.image, device),  # None: sample
                 "motion_latent": args.motion_from and motion_latent_of_video(models, args.motion_from, device)}
    except ValueError as e:  # an unknown word or class, an unreadable picture or clip (VideoError), a short clip
        fail(e)
    formats = {"mp4": [".mp4"], "gif": [".gif"], "both": [".mp4", ".gif"]}[args.format]
    for prompt in prompts:
        # One generator per prompt, seeded alike: a prompt gives the same videos wherever it is in the file.
        generator = torch.Generator(device).manual_seed(args.seed)
        with autocast_for(device, args.dtype):
            videos, content_images = generate(models, [prompt] * args.num, *steps_of(args), args.cfg_content,
                                              args.cfg_motion, generator, **given)
        save(videos, content_images, out / f"{slug(prompt)}-{args.seed}", formats, args.fps)


if __name__ == "__main__":
    main()

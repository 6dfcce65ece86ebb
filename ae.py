"""Stage 1: the content-motion autoencoder (CMD, Yu et al. ICLR 2024, Sec. 3.1).

A video x = (x_1 .. x_L) is encoded into
  * a content frame  x̄ = Σ_l softmax_l(w)_l ⊙ x_l   (Eq. 2): a per-pixel weighted sum of the
    frames with weights normalised over time, so x̄ lives where a single frame lives and a
    pretrained image diffusion model can generate it unchanged;
  * a motion latent  z: video features projected along the width and along the height
    (PVDM-style), one small D-dim token per (frame, row) and (frame, column).
A decoder rebuilds the video from (x̄, z), trained on reconstruction; the ucf preset adds LPIPS as
the release does (release_pixel_loss), and the tiny preset pulls x̄ towards the clip's middle frame
(middle_frame_loss, at the end of the file). The AE works in a "frame space": pixels (tiny and ucf
presets) or per-frame Stable Diffusion VAE latents (paper preset, `--sd`).

    python ae.py                                   # tiny preset, shapes, CPU
    python ae.py --preset ucf --data UCF-101/      # the release's UCF-101 AE, 64x64 pixels, one GPU
    python ae.py --preset paper --sd stable-diffusion-2-1-base --data webvid.csv \\
        --grad-accum 256 --grad-checkpointing          # one A100-80GB, the paper's batch of 256
    torchrun --nproc_per_node 8 ae.py --preset paper --sd stable-diffusion-2-1-base --data webvid.csv
    python ae.py --preset paper --flops [--resolution 256x512]   # parameters and FLOPs/step on `meta`
"""
import argparse
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from data import (add_training_args, fail, first_items, load_stage, local_or_name, parse_stage_args, print_costs,
                  setup_distributed, train, train_and_val_videos, video_to_uint8, write_video)


@dataclass
class AEConfig:  # the values of a preset: PRESETS, below
    frames: int            # L
    channels: int          # C of the frame space: 3 for pixels, 4 for SD latents
    height: int            # H, W of the frame space
    width: int
    patch: int             # p: the transformer sees H' x W' = (H/p) x (W/p) tokens per frame
    hidden: int
    heads: int
    encoder_depth: int
    decoder_depth: int
    motion_dim: int        # D: channels of each motion token
    feed_forward: str      # each block's MLP: "gelu", or "geglu" as in the authors' release
    sd: str                # Stable Diffusion folder or hub id whose VAE is the frame space ("" = pixels)

    @property
    def video_size(self):  # (height, width) of the pixel videos
        return self.height * frame_scale(self.sd), self.width * frame_scale(self.sd)


class Autoencoder(nn.Module):
    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = config
        self.grid = (config.height // config.patch, config.width // config.patch)  # (H', W')
        hp, wp = self.grid
        patch_dim = config.channels * config.patch ** 2
        self.gradient_checkpointing = False
        # Fixed sin-cos positions over the token grid and over time, shared by encoder and decoder:
        # the encoder must know where each token is for the pooled motion tokens to say where
        # things moved.
        self.register_buffer("pos_space", sincos_grid(hp, wp, config.hidden)[None, None], persistent=False)
        self.register_buffer("pos_time", sincos(torch.arange(config.frames), config.hidden)[None, :, None],
                             persistent=False)
        # Encoder: patches of every frame + positions -> space-time blocks.
        self.enc_patch = nn.Linear(patch_dim, config.hidden)
        self.encoder = nn.ModuleList(SpaceTimeBlock(config.hidden, config.heads, config.feed_forward)
                                     for _ in range(config.encoder_depth))
        self.enc_norm = nn.LayerNorm(config.hidden)
        # Content head: one weight logit per frame and element of the frame (w in Eq. 2).
        self.to_weight_logits = nn.Linear(config.hidden, patch_dim)
        # Motion head: features pooled along the width give row tokens, along the height column
        # tokens (PVDM's projections); a linear map per axis squeezes each to D channels.
        self.to_motion_rows = nn.Linear(config.hidden, config.motion_dim)
        self.to_motion_cols = nn.Linear(config.hidden, config.motion_dim)
        # Decoder: content-frame patches + motion tokens broadcast back over the grid.
        self.dec_content = nn.Linear(patch_dim, config.hidden)
        self.dec_rows = nn.Linear(config.motion_dim, config.hidden)
        self.dec_cols = nn.Linear(config.motion_dim, config.hidden)
        self.decoder = nn.ModuleList(SpaceTimeBlock(config.hidden, config.heads, config.feed_forward)
                                     for _ in range(config.decoder_depth))
        self.dec_norm = nn.LayerNorm(config.hidden)
        self.to_pixels = nn.Linear(config.hidden, patch_dim)
        nn.init.zeros_(self.to_pixels.weight)  # the decoder starts as "every frame = content frame"
        nn.init.zeros_(self.to_pixels.bias)

    def encode(self, frames):
        """frames (b, L, C, H, W) -> content_frame (b, C, H, W), motion_latent (b, L, H'+W', D)."""
        self.check_frames(frames)
        hp, wp = self.grid
        h = self.enc_patch(self.patchify(frames)) + self.pos_space + self.pos_time
        h = self.enc_norm(self.run_blocks(self.encoder, h))  # (b, L, H'W', hidden)
        # Eq. 2: softmax over the frame axis, per element, then a weighted sum of the input frames.
        weights = self.unpatchify(self.to_weight_logits(h)).softmax(dim=1)  # (b, L, C, H, W)
        content_frame = (weights * frames).sum(dim=1)
        h = rearrange(h, "b l (h w) c -> b l h w c", h=hp, w=wp)
        # z lists the H' row tokens, then the W' column tokens, of each frame (the release's is (D, L, W' + H'))
        motion = torch.cat([self.to_motion_rows(h.mean(dim=3)), self.to_motion_cols(h.mean(dim=2))], dim=2)
        # tanh (as in the authors' code) keeps the motion latent (b, L, H' + W', D) in [-1, 1]
        # like pixels, the range the diffusion schedule is tuned for.
        return content_frame, torch.tanh(motion)

    def decode(self, content_frame, motion_latent):
        """(b, C, H, W), (b, L, H'+W', D) -> frames (b, L, C, H, W)."""
        hp = self.grid[0]
        rows, cols = self.dec_rows(motion_latent[:, :, :hp]), self.dec_cols(motion_latent[:, :, hp:])
        motion = (rows[:, :, :, None] + cols[:, :, None, :]).flatten(2, 3)  # (b, L, H'W', hidden)
        h = self.dec_content(self.patchify(content_frame))[:, None] + motion + self.pos_space + self.pos_time
        h = self.dec_norm(self.run_blocks(self.decoder, h))
        # Each frame is the content frame plus what the motion latent says has changed.
        return content_frame[:, None] + self.unpatchify(self.to_pixels(h))

    def forward(self, frames):
        """frames -> (reconstruction, content frame): the training loss looks at both."""
        content_frame, motion_latent = self.encode(frames)
        return self.decode(content_frame, motion_latent), content_frame

    def patchify(self, x):  # (..., C, H, W) -> (..., H' W', C p p)
        p = self.config.patch
        return rearrange(x, "... c (h p) (w q) -> ... (h w) (c p q)", p=p, q=p)

    def unpatchify(self, x):  # (..., H' W', C p p) -> (..., C, H, W)
        p, (hp, wp) = self.config.patch, self.grid
        return rearrange(x, "... (h w) (c p q) -> ... c (h p) (w q)", h=hp, w=wp, p=p, q=p)

    def run_blocks(self, blocks, x):
        for block in blocks:
            x = run_block(block, x, checkpointing=self.gradient_checkpointing and self.training)
        return x

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    def check_frames(self, frames):
        config = self.config
        expected = (config.frames, config.channels, config.height, config.width)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"expected frames of shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")


# -----------------------------------------------------------------------------
# The AE's parts: the transformer block, attention, the feed-forward, positions

class SpaceTimeBlock(nn.Module):
    """Divided space-time attention (TimeSformer, the paper's AE backbone): attend across frames
    at each position, then within each frame, then an MLP; pre-norm residuals throughout."""

    def __init__(self, dim, heads, mlp="gelu"):
        super().__init__()
        self.norm_time = nn.LayerNorm(dim)
        self.time = Attention(dim, heads)
        self.norm_space = nn.LayerNorm(dim)
        self.space = Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = feed_forward(dim, mlp)

    def forward(self, x):  # (b, l, n, dim) with n = H' W' tokens per frame
        b = x.shape[0]
        xt = rearrange(self.norm_time(x), "b l n c -> (b n) l c")
        x = x + rearrange(self.time(xt), "(b n) l c -> b l n c", b=b)
        x = x + self.space(self.norm_space(x).flatten(0, 1)).view_as(x)
        return x + self.mlp(self.norm_mlp(x))


class Attention(nn.Module):
    """Multi-head attention, softmax(q k^T / sqrt(d)) v, through scaled_dot_product_attention (flash or
    memory-efficient kernels on GPU, no (N x N) matrix kept for backward). Self-attention over x
    (b, n, dim), q, k and v from one projection (as DiT's); or, built with `context_dim`,
    cross-attention from x to a context (b, s, context_dim), as motion.py's DiT reads the text."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.heads = heads
        if context_dim is None:
            self.qkv = nn.Linear(dim, 3 * dim)
        else:
            self.to_q, self.to_kv = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        if context is None:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            q, (k, v) = self.to_q(x), self.to_kv(context).chunk(2, dim=-1)
        q, k, v = (rearrange(a, "b n (h d) -> b h n d", h=self.heads) for a in (q, k, v))
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


def feed_forward(dim, kind):
    """Each block's MLP, dim -> 4 dim -> dim: GELU, or GEGLU, whose gate doubles the first layer."""
    if kind == "geglu":
        return nn.Sequential(nn.Linear(dim, 2 * 4 * dim), GEGLU(), nn.Linear(4 * dim, dim))
    return nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))


class GEGLU(nn.Module):
    """x -> a * GELU(b), (a, b) the two halves of x: the gated feed-forward of Shazeer 2020 ("GLU
    variants improve transformer"), as in the authors' AE (vit_modules.py)."""

    def forward(self, x):
        a, b = x.chunk(2, dim=-1)
        return a * F.gelu(b)


def sincos(positions, dim, max_period=10000.0):
    """(n,) positions or timesteps -> (n, dim) features [sin(p w_k), cos(p w_k)],
    w_k = max_period^(-k / (dim/2)), as in "Attention is all you need" and DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=positions.device) / half)
    angles = positions.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_grid(rows, cols, dim, device=None):
    """Fixed 2D position embedding of a rows x cols token grid, row-major: (rows*cols, dim).
    Half the channels encode the row, half the column."""
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    return torch.cat([sincos(r, dim // 2), sincos(c, dim // 2)], dim=1)


def run_block(block, *inputs, checkpointing=False):
    """block(*inputs); with `checkpointing`, while gradients are wanted, its activations are recomputed in
    the backward pass instead of kept: memory for compute (the AE's blocks, and motion.py's)."""
    if checkpointing and torch.is_grad_enabled():
        return checkpoint(block, *inputs, use_reentrant=False)
    return block(*inputs)


# -----------------------------------------------------------------------------
# The loss, and the frame space it is computed in

def training_loss(model, frames, middle_frame_weight=0.0, pixel_loss=None):
    """The AE's loss: reconstruction MSE (SD latents, the tiny preset's pixels) or `pixel_loss` (the
    ucf preset's release_pixel_loss), plus middle_frame_weight times the tiny preset's middle_frame_loss."""
    reconstruction, content_frame = model(frames)
    loss = F.mse_loss(reconstruction, frames) if pixel_loss is None else pixel_loss(reconstruction, frames)
    return loss + middle_frame_weight * middle_frame_loss(content_frame, frames)


def release_pixel_loss(lpips=None):
    """The authors' loss for an AE on pixels (reconstruction/lossperceptual.py): 4 L1 + 4 LPIPS, LPIPS on
    one random frame of each clip as there; their GAN terms never switch on (disc_start 1e7). Without
    `lpips` (its weights could not be had): 4 L1 alone."""
    def loss(reconstruction, frames):  # (b, L, 3, H, W) pixels in [-1, 1]
        l1 = 4 * F.l1_loss(reconstruction, frames)
        if lpips is None:
            return l1
        rows, frame = torch.arange(len(frames)), torch.randint(frames.shape[1], (len(frames),))
        return l1 + 4 * lpips(reconstruction[rows, frame], frames[rows, frame]).mean()
    return loss


def psnr(x, y):
    """Peak signal-to-noise ratio of videos in [-1, 1] (peak-to-peak 2), in dB."""
    mse = F.mse_loss(x.clamp(-1, 1), y.clamp(-1, 1))
    return 10 * math.log10(4 / max(mse.item(), 1e-10))


SD_MODEL = "stabilityai/stable-diffusion-2-1-base"  # the paper fine-tunes SD 2.1-base (App. B.3)
SD_VAE_SCALE, SD_VAE_CHANNELS = 8, 4  # an SD VAE latent: 8x smaller per side than the pixels, 4 channels


def frame_scale(sd):
    """Pixels per side of one frame-space element: 1 for pixel frames, the SD VAE's 8 for its latents."""
    return SD_VAE_SCALE if sd else 1


class FrameSpace:
    """Where the AE works: pixels, or per-frame Stable Diffusion VAE latents (frozen VAE). The VAE takes
    `frames_at_once` frames a batch: one at a time bounds the memory at 512x1024; more are faster by
    fewer than they cost in memory (tools/bench.py measures both; docs/results.md)."""

    def __init__(self, sd="", device="cpu", frames_at_once=1):
        self.vae, self.frames_at_once = None, frames_at_once
        if sd:
            from diffusers import AutoencoderKL
            check_sd_folder(sd, ("vae",))
            # low_cpu_mem_usage=False: the plain load, without diffusers' advice to install accelerate
            vae = AutoencoderKL.from_pretrained(sd, subfolder="vae", low_cpu_mem_usage=False)
            self.vae = vae.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, video):  # pixels (b, L, 3, H, W) in [-1, 1] -> frames (b, L, C, H', W')
        if self.vae is None:
            return video
        chunks = video.flatten(0, 1).split(self.frames_at_once)
        latents = torch.cat([self.vae.encode(chunk).latent_dist.mode() for chunk in chunks])
        return latents.unflatten(0, video.shape[:2]) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, frames):  # frames (b, L, C, H', W') -> pixels (b, L, 3, H, W)
        if self.vae is None:
            return frames.clamp(-1, 1)
        chunks = (frames.flatten(0, 1) / self.vae.config.scaling_factor).split(self.frames_at_once)
        pixels = torch.cat([self.vae.decode(chunk).sample for chunk in chunks])
        return pixels.unflatten(0, frames.shape[:2]).clamp(-1, 1)


# -----------------------------------------------------------------------------
# The presets: one row each, the AE's shape (AEConfig's fields but the frame space's, which --resolution
# and --sd set) and its training flags (data.add_training_args), with their sources

PRESETS = {
    # 32x32 pixels, 8x8 tokens per frame, width 64: small enough to train on a laptop CPU. GELU (ours):
    # GEGLU's gate widens each MLP's first layer 2x, a fifth more FLOPs a step, which a CPU pays for.
    # Training sized for the shapes world (docs/results.md): a cosine decay of the learning rate reaches
    # in half the steps what a constant one did; middle_frame_weight: see middle_frame_loss.
    "tiny": dict(data="shapes", resolution=(32, 32), sd=None, frames=16, patch=4, hidden=64, heads=4, encoder_depth=2,
                 decoder_depth=2, motion_dim=8, feed_forward="gelu",
                 steps=1200, batch_size=8, lr=2e-3, decay="cosine", betas=(0.9, 0.99), middle_frame_weight=1.0,
                 every=500),
    # The paper's Table 5 (WebVid, SD 2.1): 512x1024 videos through the SD VAE (4 x 64 x 128 latents),
    # patch 2 -> 32 x 64 tokens per frame, width 384, D = 8, so the motion latent is 16 x (32 + 64) x 8.
    # Table 5 says depth 12 and 8 heads of 64 (= 512, not 384); the authors' code uses 8 blocks per side
    # and 8 heads of 48, and GEGLU (the release's AE, as the ucf row says), which we follow.
    # Training as the authors' release (NVlabs/CMD, train_ae.py): AdamW lr 1e-5, betas (0.5, 0.9), no
    # weight decay, no EMA, no gradient clipping; the paper's global batch of 256 as the release makes it,
    # 1 video x 32 accumulated x 8 GPUs (one GPU: --grad-accum 256). The step count is not given; 100k steps
    # of 256 is ours (~2.5 epochs of WebVid-10M).
    "paper": dict(data=None, resolution=(512, 1024), sd=SD_MODEL, frames=16, patch=2, hidden=384, heads=8,
                  encoder_depth=8, decoder_depth=8, motion_dim=8, feed_forward="geglu",
                  steps=100_000, batch_size=1, grad_accum=32, lr=1e-5, betas=(0.5, 0.9), grad_clip=0.0, ema_decay=0.0,
                  every=2000),
    # The release's UCF-101 AE (train_ae.py, tools/utils.py, models/autoencoder/triplane_ae.py) on 64x64
    # pixels, 32 x 32 tokens per frame, a motion latent of 16 x (32 + 32) x 8: 47,361,064 parameters.
    # Ours, not the release's (1,554 parameters more; with these three undone, the same content frame to
    # 1e-6 on the release's weights): a LayerNorm after the encoder and after the decoder (1,536; the
    # release has none); the content-weight and output heads a Linear(hidden, C p p) of each token, one
    # bias per element, where the release's ConvTranspose2d(hidden, C, kernel = stride = p) has one per
    # channel (9 + 9); sin-cos positions where the release builds rotary ones and never applies them.
    # Its loss (release_pixel_loss) and optimiser, the paper row's, for its 2,000 epochs of trainlist01's
    # 9,537 videos at 256: 75k steps; 8 a GPU is the most that fits 80 GB (tools/paper_check.py --preset
    # ucf). Encoded on the fly: each epoch draws other clips.
    "ucf": dict(data=None, resolution=(64, 64), sd=None, frames=16, patch=2, hidden=384, heads=8, encoder_depth=8,
                decoder_depth=8, motion_dim=8, feed_forward="geglu",
                steps=75_000, batch_size=8, grad_accum=32, lr=1e-5, betas=(0.5, 0.9), grad_clip=0.0, ema_decay=0.0,
                loss="l1-lpips", every=2000),
}


def preset_config(preset, resolution=None, sd=None):
    """The AEConfig of a preset's row for videos of `resolution` (height, width) pixels (None: the row's)
    through the VAE of `sd` (None: the row's)."""
    row = PRESETS[preset]
    shape = {field.name: row[field.name] for field in fields(AEConfig) if field.name in row}
    shape["sd"] = (row["sd"] if sd is None else sd) or ""  # "": pixels
    height, width = frame_size(resolution or row["resolution"], row["patch"], shape["sd"])
    return AEConfig(**shape, channels=SD_VAE_CHANNELS if shape["sd"] else 3, height=height, width=width)


def config_at(config, resolution):
    """The same AE for videos of `resolution` (height, width) pixels."""
    height, width = frame_size(resolution, config.patch, config.sd)
    return replace(config, height=height, width=width)


def frame_size(resolution, patch, sd):
    """(height, width) of the frame space for videos of `resolution` pixels: the video itself, or its SD
    latents at 1/8 the size. Sides that the SD VAE's 8x and the AE's patches cannot divide are a
    ValueError that says which sizes work."""
    height, width = resolution
    scale = frame_scale(sd)
    unit = scale * patch
    if height % unit or width % unit:
        near = f"{max(1, round(height / unit)) * unit}x{max(1, round(width / unit)) * unit}"
        raise ValueError(f"--resolution {height}x{width}: both sides must be multiples of {unit} (the AE's patch "
                         f"{patch}{' times the SD VAE’s 8x' if sd else ''}); {near} would do")
    return height // scale, width // scale


# -----------------------------------------------------------------------------
# Training

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--sd", type=local_or_name,
                        help="Stable Diffusion folder or hub id: its VAE is the frame space")
    parser.add_argument("--middle-frame-weight", type=float, default=0.0,
                        help="weight of the pull of the content frame towards the clip's middle frame (0: none)")
    parser.add_argument("--loss", choices=("mse", "l1-lpips"), default="mse",
                        help="reconstruction MSE, or the release's 4 L1 + 4 LPIPS (pixel frames only)")
    parser.add_argument("--lpips-vgg", type=local_or_name, help="torchvision's VGG16 ImageNet weights for LPIPS, "
                        "vgg16-397923af.pth (default: torchvision's cache, downloaded there if missing)")
    add_training_args(parser)
    args = parse_stage_args(parser, "ae", PRESETS, argv)
    if args.middle_frame_weight < 0:
        parser.error(f"--middle-frame-weight wants >= 0 (0: reconstruction alone), got {args.middle_frame_weight}")
    try:
        config = preset_config(args.preset, args.resolution, args.sd)
    except ValueError as e:
        fail(e)
    if args.loss == "l1-lpips" and config.sd:
        parser.error("--loss l1-lpips compares pixels: the frames here are SD latents (use --loss mse)")
    if args.flops:
        (height, width), c = config.video_size, config
        print_costs("AE", *training_step(config), f"batch 1, {height}x{width} videos: {c.frames} x {c.channels} x "
                                                   f"{c.height} x {c.width} frames")
        if config.sd:
            print("(the SD VAE encoder that makes the frames is frozen and not counted)")
        return
    # Everything that can be wrong with the input fails here, before a run directory exists.
    try:
        rank, _, device = setup_distributed()
        frame_space = FrameSpace(config.sd, device)
        dataset, val_set = train_and_val_videos(args, config.frames, config.video_size)
        val_videos = first_items(val_set, 32)[0]
        pixel_loss = release_pixel_loss(load_lpips(args.lpips_vgg, device)) if args.loss == "l1-lpips" else None
    except (OSError, ValueError, RuntimeError) as e:
        fail(e)
    torch.manual_seed(args.seed)  # the initial weights too: one --seed, one run
    model = Autoencoder(config)

    def loss_fn(model, batch):
        return training_loss(model, frame_space.encode(batch[0]), args.middle_frame_weight, pixel_loss)

    @torch.no_grad()
    def evaluate(ema):  # PSNR of the held-out videos, a batch at a time
        videos = val_videos.to(device).split(args.batch_size)
        return {"val_psnr": psnr(torch.cat([frame_space.decode(ema(frame_space.encode(v))[0]) for v in videos]),
                                 torch.cat(videos))}

    ema = train("ae", model, loss_fn, dataset, args, asdict(config), evaluate)
    if rank == 0:  # under torchrun, one process writes the preview
        write_preview(ema, frame_space, val_set, Path(args.out) / "ae-preview.mp4", device)


@torch.no_grad()
def write_preview(ae, frame_space, dataset, path, device, n=4):
    """Held-out input | reconstruction | content frame, side by side, for a person to look at."""
    video = torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).to(device)
    content_frame, motion_latent = ae.encode(frame_space.encode(video))
    recon = frame_space.decode(ae.decode(content_frame, motion_latent))
    content = frame_space.decode(content_frame[:, None]).expand_as(video)
    rows = torch.cat([video, recon, content], dim=-1)  # side by side along the width
    grid = torch.cat(list(rows), dim=-2)  # the n videos stacked along the height
    write_video(path, video_to_uint8(grid.cpu()), fps=8)
    print(f"wrote {path} (input | reconstruction | content frame)")


def training_step(config, device="meta", batch_size=1, pixel_loss=None):
    """(model, loss()) of one training step on random frames, built on `device`: what --flops counts
    and tools/bench.py and tools/paper_check.py time."""
    with torch.device(device):
        model = Autoencoder(config)
        frames = torch.rand(batch_size, config.frames, config.channels, config.height, config.width) * 2 - 1
    return model, lambda: training_loss(model, frames, pixel_loss=pixel_loss)


# -----------------------------------------------------------------------------
# Loaders: a trained AE, LPIPS's network, a Stable Diffusion folder

def load_ae(run_dir, device="cpu", resolution=None):
    """A trained AE from `runs/<name>` (EMA weights), frozen, plus its frame space. With `resolution`
    (height, width) it works on videos of that size: its positions are sin-cos functions of the
    token grid, not learned, so the same weights apply to any grid."""
    info, state = load_stage(run_dir, "ae")
    config = AEConfig(**info["config"])
    ae = Autoencoder(config_at(config, resolution) if resolution else config)
    ae.load_state_dict(state)
    return ae.to(device).eval().requires_grad_(False), FrameSpace(ae.config.sd, device)


def load_lpips(vgg_path=None, device="cpu"):
    """LPIPS (Zhang et al. 2018) on VGG16 features with its learned layers (the lpips package), frozen.
    VGG16's ImageNet weights: `vgg_path`, torchvision's vgg16-397923af.pth on your disk, or else
    torchvision's cache, downloaded into it if missing. None, said in one line, where neither can be had."""
    with warnings.catch_warnings():  # lpips asks torchvision for VGG16 by its deprecated `pretrained` flag
        warnings.simplefilter("ignore", UserWarning)
        if vgg_path is None:
            try:
                return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)
            except OSError as e:  # offline, and nothing in torchvision's cache
                print(f"LPIPS: no VGG16 weights ({e}): the AE's loss is 4 L1 alone; --lpips-vgg names a local file")
                return None
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    try:
        state = torch.load(vgg_path, map_location="cpu", weights_only=True)
        layers = {name.split(".", 1)[1]: name for name in model.net.state_dict()}  # "10.bias" -> "slice3.10.bias"
        model.net.load_state_dict({layers[k.removeprefix("features.")]: v for k, v in state.items()
                                   if k.removeprefix("features.") in layers})
    except (RuntimeError, KeyError, pickle.UnpicklingError, AttributeError) as e:
        raise ValueError(f"--lpips-vgg {vgg_path} holds no torchvision VGG16 weights "
                         f"({str(e).splitlines()[0]})") from e
    return model.to(device).eval().requires_grad_(False)


def check_sd_folder(path, parts=("vae",)):
    """A local Stable Diffusion folder (diffusers layout) must hold the parts we load; a hub id passes."""
    if Path(path).exists():
        for need in (f"{part}/{'scheduler_config' if part == 'scheduler' else 'config'}.json" for part in parts):
            if not (Path(path) / need).is_file():
                raise FileNotFoundError(
                    f"{path} is not a Stable Diffusion folder: it lacks {need}. An SD folder (diffusers layout, "
                    "e.g. a download of stabilityai/stable-diffusion-2-1-base) holds vae/, unet/ and scheduler/")


# -----------------------------------------------------------------------------
# Not the paper's method: the tiny preset's pull of the content frame towards the middle frame

def middle_frame_loss(content_frame, frames):
    """||x̄ - x_{L/2}||², the pull of the content frame towards the clip's middle frame.

    Eq. 2 leaves x̄ free to be any per-pixel blend of the frames, and the paper trains the AE on
    reconstruction alone. Where everything moves, as in the shapes world, a free blend smears a
    moving shape along its path and turns a rotating square into a disc: the outline then lives
    in the motion latent, not in x̄, against "all of the content in x̄, all of the change in z",
    and both diffusion models must learn it. Weighted by --middle-frame-weight (tiny preset 1,
    paper 0), the pull makes x̄ a frame of the clip at no cost in reconstruction (docs/results.md)."""
    return F.mse_loss(content_frame, frames[:, frames.shape[1] // 2])


if __name__ == "__main__":
    main()

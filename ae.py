"""Stage 1: the content-motion autoencoder (CMD, Yu et al. ICLR 2024, Sec. 3.1).

A video x = (x_1 .. x_L) is encoded into
  * a content frame  x̄ = Σ_l softmax_l(w)_l ⊙ x_l   (Eq. 2): a per-pixel weighted sum of the
    frames with weights normalised over time, so x̄ lives where a single frame lives and a
    pretrained image diffusion model can generate it unchanged;
  * a motion latent  z: video features projected along the width and along the height
    (PVDM-style), one small D-dim token per (frame, row) and (frame, column).
A decoder rebuilds the video from (x̄, z). The AE works in a "frame space": pixels (tiny
preset) or per-frame Stable Diffusion VAE latents (paper preset, `--sd`).

    python ae.py                                   # tiny preset, shapes, CPU, ~10 minutes
    python ae.py --preset paper --sd stabilityai/stable-diffusion-2-1-base --data webvid.csv \\
        --batch-size 1 --grad-checkpointing          # one A100-80GB
    torchrun --nproc_per_node 8 ae.py --preset paper --sd ... --data webvid.csv
    python ae.py --preset paper --flops            # parameters and FLOPs/step on `meta`
"""
import argparse
import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from data import (add_training_args, count_flops, load_stage, make_dataset, save_safetensors_atomic,
                  setup_distributed, train, video_to_uint8, write_video)


@dataclass
class AEConfig:
    frames: int = 16       # L
    channels: int = 3      # C of the frame space: 3 for pixels, 4 for SD latents
    height: int = 32       # H, W of the frame space
    width: int = 32
    patch: int = 4         # p: the transformer sees (H/p) x (W/p) tokens per frame
    hidden: int = 64
    heads: int = 4
    encoder_depth: int = 2
    decoder_depth: int = 2
    motion_dim: int = 8    # D: channels of each motion token
    sd: str = ""           # Stable Diffusion folder or hub id whose VAE is the frame space ("" = pixels)

    @property
    def video_size(self):  # side of the pixel videos: the SD VAE downsamples 8x
        return self.height * (8 if self.sd else 1)


PRESETS = {
    # 32x32 pixels, 8x8 tokens per frame, width 64: ~0.2 s per step of 8 videos on 2 CPU cores.
    "tiny": AEConfig(),
    # The paper's Table 5 (WebVid, SD 2.1): 512x1024 videos through the SD VAE (4 x 64 x 128
    # latents), patch 2 -> 32 x 64 tokens per frame, width 384, D = 8, so the motion latent is
    # 16 x (32 + 64) x 8. Table 5 says depth 12 and 8 heads of 64 (= 512, not 384); the
    # authors' code uses 8 blocks per side and 8 heads of 48, which we follow.
    "paper": AEConfig(channels=4, height=64, width=128, patch=2, hidden=384, heads=8,
                      encoder_depth=8, decoder_depth=8, motion_dim=8,
                      sd="stabilityai/stable-diffusion-2-1-base"),  # the paper fine-tunes SD 2.1-base
}


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


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash / memory-efficient
    kernels on GPU, no (N x N) matrix kept for backward)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):  # (b, n, dim)
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        return self.proj(rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)"))


class SpaceTimeBlock(nn.Module):
    """Divided space-time attention (TimeSformer, the paper's AE backbone): attend across frames
    at each position, then within each frame, then an MLP; pre-norm residuals throughout."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm_time, self.time = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_space, self.space = nn.LayerNorm(dim), Attention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))

    def forward(self, x):  # (b, l, n, dim) with n = H' W' tokens per frame
        b = x.shape[0]
        xt = rearrange(self.norm_time(x), "b l n c -> (b n) l c")
        x = x + rearrange(self.time(xt), "(b n) l c -> b l n c", b=b)
        x = x + self.space(self.norm_space(x).flatten(0, 1)).view_as(x)
        return x + self.mlp(self.norm_mlp(x))


class Autoencoder(nn.Module):
    def __init__(self, config: AEConfig):
        super().__init__()
        self.config = c = config
        self.grid = (c.height // c.patch, c.width // c.patch)  # (H', W')
        hp, wp = self.grid
        patch_dim = c.channels * c.patch ** 2
        self.gradient_checkpointing = False
        # Fixed sin-cos positions over the token grid and over time, shared by encoder and decoder:
        # the encoder must know where each token is for the pooled motion tokens to say where
        # things moved.
        self.register_buffer("pos_space", sincos_grid(hp, wp, c.hidden)[None, None], persistent=False)
        self.register_buffer("pos_time", sincos(torch.arange(c.frames), c.hidden)[None, :, None], persistent=False)
        # Encoder: patches of every frame + positions -> space-time blocks.
        self.enc_patch = nn.Linear(patch_dim, c.hidden)
        self.encoder = nn.ModuleList(SpaceTimeBlock(c.hidden, c.heads) for _ in range(c.encoder_depth))
        self.enc_norm = nn.LayerNorm(c.hidden)
        # Content head: one weight logit per frame and element of the frame (w in Eq. 2).
        self.to_weight_logits = nn.Linear(c.hidden, patch_dim)
        # Motion head: features pooled along the width give row tokens, along the height column
        # tokens (PVDM's projections); a linear map per axis squeezes each to D channels.
        self.to_motion_rows, self.to_motion_cols = nn.Linear(c.hidden, c.motion_dim), nn.Linear(c.hidden, c.motion_dim)
        # Decoder: content-frame patches + motion tokens broadcast back over the grid.
        self.dec_content = nn.Linear(patch_dim, c.hidden)
        self.dec_rows, self.dec_cols = nn.Linear(c.motion_dim, c.hidden), nn.Linear(c.motion_dim, c.hidden)
        self.decoder = nn.ModuleList(SpaceTimeBlock(c.hidden, c.heads) for _ in range(c.decoder_depth))
        self.dec_norm = nn.LayerNorm(c.hidden)
        self.to_pixels = nn.Linear(c.hidden, patch_dim)
        nn.init.zeros_(self.to_pixels.weight)  # the decoder starts as "every frame = content frame"
        nn.init.zeros_(self.to_pixels.bias)

    def enable_gradient_checkpointing(self):
        self.gradient_checkpointing = True

    def run_blocks(self, blocks, x):
        for block in blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.gradient_checkpointing and self.training else block(x)
        return x

    def patchify(self, x):  # (..., C, H, W) -> (..., H' W', C p p)
        p = self.config.patch
        return rearrange(x, "... c (h p) (w q) -> ... (h w) (c p q)", p=p, q=p)

    def unpatchify(self, x):  # (..., H' W', C p p) -> (..., C, H, W)
        p, (hp, wp) = self.config.patch, self.grid
        return rearrange(x, "... (h w) (c p q) -> ... c (h p) (w q)", h=hp, w=wp, p=p, q=p)

    def check_frames(self, frames):
        c = self.config
        expected = (c.frames, c.channels, c.height, c.width)
        if frames.dim() != 5 or tuple(frames.shape[1:]) != expected:
            raise ValueError(f"expected frames of shape (batch, {', '.join(map(str, expected))}), "
                             f"got {tuple(frames.shape)}")

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
        return self.decode(*self.encode(frames))


class FrameSpace:
    """Where the AE works: pixels, or per-frame Stable Diffusion VAE latents (frozen VAE)."""

    def __init__(self, sd="", device="cpu"):
        self.vae = None
        if sd:
            from diffusers import AutoencoderKL
            self.vae = AutoencoderKL.from_pretrained(sd, subfolder="vae").to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, video):  # pixels (b, L, 3, H, W) in [-1, 1] -> frames (b, L, C, H', W')
        if self.vae is None:
            return video
        # Frames go through the VAE one at a time (batch b), as the issue asks, to bound memory.
        latents = [self.vae.encode(video[:, i]).latent_dist.mode() for i in range(video.shape[1])]
        return torch.stack(latents, dim=1) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode(self, frames):  # frames (b, L, C, H', W') -> pixels (b, L, 3, H, W)
        if self.vae is None:
            return frames.clamp(-1, 1)
        frames = frames / self.vae.config.scaling_factor
        pixels = [self.vae.decode(frames[:, i]).sample for i in range(frames.shape[1])]
        return torch.stack(pixels, dim=1).clamp(-1, 1)


def load_ae(run_dir, device="cpu"):
    """A trained AE from `runs/<name>` (EMA weights), frozen, plus its frame space."""
    info, state = load_stage(run_dir, "ae")
    ae = Autoencoder(AEConfig(**info["config"]))
    ae.load_state_dict(state)
    return ae.to(device).eval().requires_grad_(False), FrameSpace(ae.config.sd, device)


def add_latent_args(parser):
    """Flags of the stages that train on the AE's latents (content.py, motion.py)."""
    parser.add_argument("--ae", default=None, help="run directory of a trained AE (default: --out)")
    parser.add_argument("--cache", action=argparse.BooleanOptionalAction, default=None,
                        help="encode the dataset with the AE once, keep it on disk as <out>/latents.safetensors "
                             "(default: on for the tiny preset, where encoding is 30%% of a CPU step; off for "
                             "paper, whose videos are too many to store and are better drawn at random clip starts)")


def latent_dataset(args, ae, frame_space, device):
    """The videos of --data, or with caching on their (content frame, motion latent) pairs."""
    c = ae.config
    dataset = make_dataset(args.data, frames=c.frames, size=c.video_size, seed=args.seed)
    if not (args.cache if args.cache is not None else args.preset == "tiny"):
        return dataset
    # What the cache was made from: the AE's exact weights and the videos. Another AE or other
    # videos make it stale, and it is encoded again.
    ae_weights = Path(args.ae or args.out) / "ae.safetensors"
    source = {"ae_sha256": hashlib.sha256(ae_weights.read_bytes()).hexdigest(), "data": str(args.data),
              "videos": len(dataset), "seed": args.seed}
    return cache_latents(ae, frame_space, dataset, Path(args.out) / "latents.safetensors", device, source)


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
def cache_latents(ae, frame_space, dataset, path, device, source, batch_size=64):
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
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size)
        content, motion, captions = [], [], []
        for videos, texts in tqdm(loader, desc=f"caching {path.name}"):
            c, m = ae.encode(frame_space.encode(videos.to(device)))
            content.append(c.cpu()), motion.append(m.cpu()), captions.extend(texts)
        tensors = {"content_frames": torch.cat(content), "motion_latents": torch.cat(motion)}
        save_safetensors_atomic(path, tensors, {"captions": json.dumps(captions), "source": source})
    if dist.is_initialized():
        dist.barrier()
    with safe_open(path, "pt") as f:
        captions = json.loads(f.metadata()["captions"])
        content, motion = f.get_tensor("content_frames"), f.get_tensor("motion_latents")
    return [(c, m, caption) for c, m, caption in zip(content, motion, captions)]


def psnr(x, y):
    """Peak signal-to-noise ratio of videos in [-1, 1] (peak-to-peak 2), in dB."""
    mse = F.mse_loss(x.clamp(-1, 1), y.clamp(-1, 1))
    return 10 * math.log10(4 / max(mse.item(), 1e-10))


def print_costs(config, batch_size=1):
    """Parameter count and FLOPs of one training step (forward + backward ~ 3x forward),
    counted on the `meta` device: nothing is allocated."""
    with torch.device("meta"):
        ae = Autoencoder(config)
        frames = torch.empty(batch_size, config.frames, config.channels, config.height, config.width)
    params = sum(p.numel() for p in ae.parameters())
    flops = count_flops(lambda: F.mse_loss(ae(frames), frames).backward())
    print(f"AE: {params / 1e6:.1f} M parameters, {flops / 1e12:.3f} TFLOPs per training step "
          f"(batch {batch_size}, {config.frames} x {config.channels} x {config.height} x {config.width} frames)")
    return params, flops


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--sd", default=None, help="Stable Diffusion folder or hub id: its VAE is the frame space")
    add_training_args(parser, steps=2400, batch_size=8, lr=2e-3, every=400)
    args = parser.parse_args()
    config = PRESETS[args.preset] if args.sd is None else replace(PRESETS[args.preset], sd=args.sd)
    if args.flops:
        print_costs(config)
        if config.sd:
            print("(the SD VAE encoder that makes the frames is frozen and not counted)")
        return
    args.out = args.out or f"runs/{args.preset}"
    dataset = make_dataset(args.data, frames=config.frames, size=config.video_size, seed=args.seed)
    val_videos = torch.stack([make_dataset("shapes", frames=config.frames, size=config.video_size, seed=10_000)[i][0]
                              for i in range(32)]) if args.data == "shapes" else None
    rank, _, device = setup_distributed()
    frame_space = FrameSpace(config.sd, device)
    torch.manual_seed(args.seed)  # the initial weights too: one --seed, one run
    model = Autoencoder(config)

    def loss_fn(model, batch):
        frames = frame_space.encode(batch[0])
        return F.mse_loss(model(frames), frames)

    @torch.no_grad()
    def evaluate(ema):
        if val_videos is None:
            return {}
        video = val_videos.to(device)
        return {"val_psnr": psnr(frame_space.decode(ema(frame_space.encode(video))), video)}

    ema = train("ae", model, loss_fn, dataset, args, asdict(config), evaluate)
    if rank == 0:  # under torchrun, one process writes the preview
        write_preview(ema, frame_space, dataset, Path(args.out) / "ae-preview.mp4", device)


@torch.no_grad()
def write_preview(ae, frame_space, dataset, path, device, n=4):
    """input | reconstruction | content frame, side by side, for a person to look at."""
    video = torch.stack([dataset[i][0] for i in range(n)]).to(device)
    content_frame, motion_latent = ae.encode(frame_space.encode(video))
    recon = frame_space.decode(ae.decode(content_frame, motion_latent))
    content = frame_space.decode(content_frame[:, None]).expand_as(video)
    rows = torch.cat([video, recon, content], dim=-1)  # side by side along the width
    grid = torch.cat(list(rows), dim=-2)  # the n videos stacked along the height
    write_video(path, video_to_uint8(grid.cpu()), fps=8)
    print(f"wrote {path} (input | reconstruction | content frame)")


if __name__ == "__main__":
    main()

"""Stage 3 of CMD: the motion diffusion model (arXiv 2403.14148, Sec. 3.2, Eq. 8).

The autoencoder (ae.py) splits a video into a content frame x̄ (C, H, W) and a motion
latent z (L, N = H' + W', D). content.py generates x̄ from text (Stable Diffusion at paper
scale); this file generates z with a new diffusion transformer (DiT, Peebles & Xie 2023),
conditioned on the text and on the content frame. As in the paper, the content frame
enters as input-level patch embeddings ("dense conditions") and the text, like the
timestep, through adaptive layer normalisation.

The model only maps (noisy z, timestep, content frame, text) -> a tensor shaped like z
(epsilon or v); the diffusion maths (noise schedule, DDIM) live in content.py.

    python motion.py                                          # tiny preset, shapes, CPU
    python motion.py --preset ucf --data UCF-101/             # class-conditional UCF-101, one GPU
    python motion.py --preset paper --text-weights open_clip_vit_h14.bin --data webvid.csv \\
        --grad-accum 256 --grad-checkpointing                 # one A100-80GB
    torchrun --nproc_per_node 8 motion.py --preset paper --text-weights ... --data webvid.csv
    python motion.py --preset paper --flops [--resolution 256x512]   # parameters and FLOPs on `meta`
"""
import argparse
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
from einops import rearrange

from ae import Attention, run_block, sincos, sincos_grid
from content import PRESETS as CONTENT_PRESETS
from content import Diffusion, DiffusionConfig, drop_prompts, flops_sizes, latent_stage, text_shapes
from data import (add_latent_args, add_training_args, encode_videos, fail, held_out_loss, load_stage,
                  parse_stage_args, print_costs, train, video_to_uint8, write_video)


@dataclass
class MotionConfig(DiffusionConfig):
    # Set by the AE and the text encoder the DiT works with (shapes_from), never by a preset: the motion
    # latent z (L, N = H' + W', D), H' tokens a frame from the AE's rows and W' from its columns; the content
    # frame x̄ (C, H, W) in the AE's frame space; the text features, tokens (B, S, text_dim), pooled (B, pooled_dim)
    frames: int
    latent_h: int
    latent_w: int
    latent_dim: int
    frame_channels: int
    frame_height: int
    frame_width: int
    text_dim: int
    pooled_dim: int
    # The DiT (PRESETS): one token covers patch_frames x patch_tokens latent vectors, one content token a
    # content_patch x content_patch patch of x̄; width, depth, heads; our additions cross_attention and
    # pool_text (AttentionPooling, at the end of the file)
    patch_frames: int
    patch_tokens: int
    content_patch: int
    hidden: int
    depth: int
    heads: int
    mlp_ratio: float
    cross_attention: bool
    pool_text: bool

    def __post_init__(self):
        # A token must not straddle the height/width boundary of z, nor the frame edge.
        if self.frames % self.patch_frames or (self.latent_h + self.latent_w) % self.patch_tokens \
                or self.latent_h % self.patch_tokens:
            raise ValueError(f"motion DiT: its {self.patch_frames} x {self.patch_tokens} patches must divide the "
                             f"motion latent's {self.frames} frames and its H' = {self.latent_h}, "
                             f"W' = {self.latent_w} tokens: pick a --resolution they divide")
        if self.frame_height % self.content_patch or self.frame_width % self.content_patch:
            raise ValueError(f"motion DiT: its content patch {self.content_patch} must divide the "
                             f"{self.frame_height}x{self.frame_width} content frame: pick a --resolution it divides")
        assert self.hidden % self.heads == 0 and (self.hidden // self.heads) % 2 == 0


def modulate(x, shift, scale):
    # adaLN: a LayerNorm whose affine parameters are predicted from the condition c.
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    """Diffusion timestep t (B,) -> (B, hidden): sinusoidal features, then an MLP (DiT)."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        return self.mlp(sincos(t, self.freq_dim).to(self.mlp[0].weight.dtype))  # bf16 weights, no autocast


class DiTBlock(nn.Module):
    """adaLN-Zero block: the condition c predicts a shift, scale and gate for the
    attention and for the MLP (DiT Sec. 3.2); zero-initialised in MotionDiT."""

    def __init__(self, config):
        super().__init__()
        h = config.hidden
        self.norm1 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(h, config.heads)
        self.cross_attn = None
        if config.cross_attention:
            # Text tokens, unmodulated and residual, as in PixArt-alpha. Not in the paper,
            # whose DiT sees only the pooled text; our addition (MotionConfig).
            self.norm_cross = nn.LayerNorm(h)
            self.cross_attn = Attention(h, config.heads, context_dim=config.text_dim)
        self.norm2 = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        mlp_h = int(h * config.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(h, mlp_h), nn.GELU(approximate="tanh"), nn.Linear(mlp_h, h))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(h, 6 * h))

    def forward(self, x, c, text_tokens):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), text_tokens)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class MotionDiT(nn.Module):
    """forward(z_t (B,L,N,D), t (B,), content_frame (B,C,H,W), text_tokens (B,S,Dt),
    text_pooled (B,Dp)) -> (B,L,N,D); text_tokens are only read with config.cross_attention or pool_text."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        # Motion tokens: z is read as a D-channel "image" on the (L, N) grid and cut into
        # patch_frames x patch_tokens patches, as the paper does ("/2"). At paper size the
        # grid is 16 x 96: 384 tokens instead of 1536, and no token spans both spatial axes.
        patch_in = config.patch_frames * config.patch_tokens * config.latent_dim
        self.motion_embed = nn.Linear(patch_in, config.hidden)
        n = config.latent_h + config.latent_w
        self.grid = (config.frames // config.patch_frames, n // config.patch_tokens)
        # Fixed (not learned) 2D sin-cos positions, as DiT: rows are frames, columns run
        # through the H' height tokens and then the W' width tokens. Recomputed from the
        # config, so they are not saved in checkpoints.
        self.register_buffer("motion_pos", sincos_grid(*self.grid, config.hidden), persistent=False)
        # Content frame: fed "as input-level patch embeddings like z_t to provide dense
        # conditions" (paper Sec. 3.2), i.e. joined to the motion tokens in one
        # self-attention sequence and dropped at the output (as in the authors' code). A
        # larger patch than z's keeps the sequence short (paper: 8 for 64x128 latents).
        p = config.content_patch
        self.content_embed = nn.Conv2d(config.frame_channels, config.hidden, kernel_size=p, stride=p)
        content_grid = (config.frame_height // p, config.frame_width // p)
        self.register_buffer("content_pos", sincos_grid(*content_grid, config.hidden), persistent=False)
        # Condition c = timestep embedding + a linear projection of the pooled text feature
        # (paper App. B.3), fed to every adaLN. Classifier-free guidance needs no learned null
        # embedding: training replaces some captions by "", whose features are the
        # unconditional input; the content frame is kept in both branches (paper App. E).
        self.t_embed = TimestepEmbedder(config.hidden)
        self.text_embed = nn.Linear(config.pooled_dim, config.hidden)
        self.text_pool = AttentionPooling(config.text_dim, config.hidden, config.heads) if config.pool_text else None
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        # Final layer: adaLN-modulated LayerNorm + linear back to patches. D outputs (epsilon
        # or v), not the paper's 2D with a learned variance: our DDIM does not use one.
        self.norm_out = nn.LayerNorm(config.hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden, 2 * config.hidden))
        self.out = nn.Linear(config.hidden, patch_in)
        self.initialize_weights()

    def forward(self, z, t, content_frame, text_tokens, text_pooled):
        config = self.config
        expected = (config.frames, config.latent_h + config.latent_w, config.latent_dim)
        if tuple(z.shape[1:]) != expected:
            raise ValueError(f"motion latent of shape {tuple(z.shape)}, expected (B, *{expected})")
        pf, pt = config.patch_frames, config.patch_tokens
        x = rearrange(z, "b (l p) (n q) d -> b (l n) (p q d)", p=pf, q=pt)
        x = self.motion_embed(x) + self.motion_pos                  # (B, T_motion, hidden)
        content = self.content_embed(content_frame)                # (B, hidden, H/p, W/p)
        content = rearrange(content, "b c h w -> b (h w) c") + self.content_pos
        num_motion = x.shape[1]
        x = torch.cat([x, content], dim=1)                         # (B, T_motion + T_content, h)
        c = self.t_embed(t) + self.text_embed(text_pooled)         # (B, hidden)
        if self.text_pool is not None:
            c = c + self.text_pool(text_tokens)
        for block in self.blocks:
            x = run_block(block, x, c, text_tokens, checkpointing=self.gradient_checkpointing and self.training)
        x = x[:, :num_motion]                                      # drop the content tokens
        shift, scale = self.adaLN_out(c).chunk(2, dim=1)
        x = self.out(modulate(self.norm_out(x), shift, scale))    # (B, T_motion, pf*pt*D)
        return rearrange(x, "b (l n) (p q d) -> b (l p) (n q) d", n=self.grid[1], p=pf, q=pt)

    def initialize_weights(self):
        # DiT's recipe: Xavier-uniform linear layers (and patch embedding), N(0, 0.02) for
        # the timestep MLP ...
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for layer in (self.t_embed.mlp[0], self.t_embed.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
        # ... and zeros for the adaLN modulations (so every gate is 0), the cross-attention
        # output and the final linear: every block starts as the identity and the untrained
        # model predicts exactly 0 ("adaLN-Zero", DiT Sec. 3.2).
        zero = [self.adaLN_out[1], self.out]
        for block in self.blocks:
            zero.append(block.adaLN[1])
            if block.cross_attn is not None:
                zero.append(block.cross_attn.proj)
        for layer in zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def enable_gradient_checkpointing(self):
        """Recompute each block's activations in the backward pass (diffusers' name)."""
        self.gradient_checkpointing = True


def dit_model_fn(model):
    """The DiT as a Diffusion model_fn(z, t, cond) with cond = (content_frame, text_tokens, text_pooled)."""
    return lambda z, t, cond: model(z, t, *cond)


@torch.no_grad()
def sample_motion(model, diffusion, content_frame, text, null_text, steps, cfg_scale, generator=None, progress=True,
                  cuda_graph=True):
    """Algorithm 1, step 3: motion latents z_0 (B, L, H'+W', D) from z_T ~ N(0, I) by guided DDIM on the DiT,
    for content frames (B, C, H, W) and the text features (tokens, pooled) of the prompts and of "". As in
    the paper, guidance drops only the text: both branches see x̄."""
    c = model.config
    shape = (len(content_frame), c.frames, c.latent_h + c.latent_w, c.latent_dim)
    return diffusion.ddim_sample(dit_model_fn(model), shape, (content_frame, *text), (content_frame, *null_text),
                                 steps=steps, cfg_scale=cfg_scale, generator=generator, progress=progress,
                                 desc="motion", cuda_graph=cuda_graph)


# -----------------------------------------------------------------------------
# The presets: one row each, the DiT (MotionConfig's fields but those shapes_from sets) and its
# training flags (data.add_training_args), with their sources

# DiT's widths (Peebles & Xie 2023, Table 1): --size picks one instead of a preset's
DIT_SIZES = {
    "S": dict(hidden=384, depth=12, heads=6),
    "B": dict(hidden=768, depth=12, heads=12),
    "L": dict(hidden=1024, depth=24, heads=16),
    "XL": dict(hidden=1152, depth=28, heads=16),
}

PRESETS = {
    # The shapes world on a laptop CPU, with the latent cache: z of 16 x (8 + 8) x 8, a DiT of width 128 and
    # depth 4, our cross-attention and pooling on (MotionConfig). v on the zero-terminal-SNR schedule
    # (DiffusionConfig) with the plain loss, as in the paper: Min-SNR weighs the noisiest steps, where the
    # DiT decides which way a shape moves, by about their SNR, near 0, and reversed a third of the directions
    # (docs/results.md). Guidance 1.5: stronger guidance draws the shape's outline twice; 25 DDIM steps, as
    # good as 50 there. lr 2e-3 learned the motion faster than 1e-3.
    "tiny": dict(data="shapes", cache=True, every=500, patch_frames=2, patch_tokens=2, content_patch=4,
                 hidden=128, depth=4, heads=4, mlp_ratio=4.0, cross_attention=True, pool_text=True,
                 prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=None, cfg_scale=1.5, sample_steps=25,
                 steps=1800, batch_size=16, lr=2e-3, decay="cosine", betas=(0.9, 0.99)),
    # WebVid-10M text-to-video at 512x1024, frames as SD-2.1 latents 4x64x128. Paper: DiT-XL/2 "for
    # WebVid-10M" (Sec. 4.1); z patch 2 and content-frame patch 8 (Table 6); OpenCLIP ViT-H text with no
    # cross-attention (App. B.3: only a linear projection into the adaLN). Ours: v on SD's scaled-linear
    # schedule, not rescaled (the paper's DiT predicts eps on DiT's linear betas: one schedule for both
    # stages keeps one to read), the plain loss; guidance 3 (the paper gives none for the motion); 50 DDIM
    # steps (App. B.4). The authors' release (NVlabs/CMD): AdamW lr 1e-4, no weight decay, EMA 0.9999,
    # gradient clip 1; betas are torch's default, no warm-up, as DiT; the paper's batch of 256: 1 x 32
    # accumulated x 8 GPUs. The step count is not given; 100k steps of 256 is ours.
    "paper": dict(data=None, cache=False, every=2000, patch_frames=2, patch_tokens=2, content_patch=8,
                  **DIT_SIZES["XL"], mlp_ratio=4.0, cross_attention=False, pool_text=False,
                  prediction_type="v_prediction", zero_terminal_snr=False, snr_gamma=None, cfg_scale=3.0,
                  sample_steps=50, steps=100_000, batch_size=1, grad_accum=32, lr=1e-4),
    # Class-conditional UCF-101 at 64x64 pixels, as the release (train_motion_diffusion.py): DiT-B/2 by its
    # default, content-frame ("keyframe") patch 4, the AE's z of 16 x (32 + 32) x 8. The class enters the
    # adaLN through text_embed (one-hot: a class table), as the release meant to (its `c = t` drops it).
    # Ours: v on the zero-terminal-SNR schedule, as the content model; guidance 3, as the paper preset (the
    # release samples motion without guidance). The release's optimiser, the paper row's, for its 1,400
    # epochs of trainlist01's 9,537 videos at 256: 52k steps; all 256 fit one GPU's 80 GB.
    "ucf": dict(data=None, cache=False, every=2000, patch_frames=2, patch_tokens=2, content_patch=4,
                **DIT_SIZES["B"], mlp_ratio=4.0, cross_attention=False, pool_text=False,
                prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=None, cfg_scale=3.0, sample_steps=50,
                steps=52_000, batch_size=256, grad_accum=1, lr=1e-4),
}


def shapes_from(ae_config, text_widths=None):
    """The MotionConfig fields fixed by the AE (latent and frame shapes) and the text encoder's
    (token width, pooled width)."""
    shapes = dict(frames=ae_config.frames, latent_h=ae_config.height // ae_config.patch,
                  latent_w=ae_config.width // ae_config.patch, latent_dim=ae_config.motion_dim,
                  frame_channels=ae_config.channels, frame_height=ae_config.height, frame_width=ae_config.width)
    if text_widths is not None:
        shapes.update(text_dim=text_widths[0], pooled_dim=text_widths[1])
    return shapes


def check_dit_fits(config, ae_config, text_widths):
    """A DiT takes the shapes of one AE and text encoder: those it is used with, or a ValueError that says
    what differs."""
    made = shapes_from(ae_config, text_widths)
    wrong = [f"{k} {getattr(config, k)} where they give {v}" for k, v in made.items() if getattr(config, k) != v]
    if wrong:
        raise ValueError(f"its motion DiT was built for another AE or text encoder ({', '.join(wrong)})")


def config_for(preset, size, ae_config, text_widths):
    """The MotionConfig of a preset's row, with the widths of DiT's `size` or of another preset's row
    (None: its own), every shape taken from the AE and the text encoder it must fit."""
    own = PRESETS[size or preset]
    widths = DIT_SIZES[size] if size in DIT_SIZES else {k: own[k] for k in ("hidden", "depth", "heads")}
    values = {**PRESETS[preset], **widths, **shapes_from(ae_config, text_widths)}
    return MotionConfig(**{name: values[name] for name in MotionConfig.__dataclass_fields__})


# -----------------------------------------------------------------------------
# Training

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--size", default=None, choices=[*DIT_SIZES, *PRESETS],
                        help="the DiT's width and depth: one of DiT's sizes, or another preset's (default: its own)")
    add_latent_args(parser)
    add_training_args(parser)
    args = parse_stage_args(parser, "motion", PRESETS, argv)
    text = args.text or CONTENT_PRESETS[args.preset]["text"]  # the text encoder stage 2 trains with
    if args.flops:  # on `meta`, at the sizes of --ae's run or of the preset
        try:
            frames, text_config = flops_sizes(args, text)
            tokens, *widths = text_shapes(text_config)
            config = config_for(args.preset, args.size, frames, widths)
        except (OSError, ValueError) as e:
            fail(e)
        return print_costs("motion DiT", *training_step(config, text_len=tokens),
                           f"batch 1, {frames.video_size[0]}x{frames.video_size[1]} videos")
    rank, device, text_encoder, ae, frame_space, dataset, val_batch = latent_stage(
        args, text, CONTENT_PRESETS[args.preset]["text_pretrained"])
    torch.manual_seed(args.seed)  # the initial weights too: one --seed, one run
    try:
        config = config_for(args.preset, args.size, ae.config, (text_encoder.width, text_encoder.embed_dim))
        model = MotionDiT(replace(config, snr_gamma=args.snr_gamma))
    except ValueError as e:
        fail(e)
    schedule = model.config.schedule()
    diffusion = Diffusion(**schedule)
    snr_gamma = model.config.snr_gamma  # loss_fn gets the model, or its DDP wrapper

    def loss_fn(model, batch):
        content_frame, motion_latent, captions = encode_videos(ae, frame_space, batch)
        tokens, pooled = text_encoder(drop_prompts(captions))  # guidance: some prompts become ""
        return diffusion.loss(dit_model_fn(model), motion_latent, (content_frame, tokens, pooled), snr_gamma)

    run_config = {"model": asdict(model.config), "schedule": schedule, "text_weights": args.text_weights}
    ema = train("motion", model, loss_fn, dataset, args, run_config, held_out_loss(loss_fn, val_batch))
    if rank == 0:  # under torchrun, one process writes the preview
        write_motion_preview(ema, diffusion, ae, frame_space, text_encoder, val_batch,
                             Path(args.out) / "motion-samples.mp4")


@torch.no_grad()
def write_motion_preview(model, diffusion, ae, frame_space, text_encoder, val_batch, path, n=4):
    """Held-out videos as the AE rebuilds them | with generated motion: the generated motion starts
    from the real video's content frame and caption, so any difference is the motion model's."""
    content_frame, motion_latent, captions = (x[:n] for x in val_batch)
    generator = torch.Generator(content_frame.device).manual_seed(0)
    motion = sample_motion(model, diffusion, content_frame, text_encoder(captions), text_encoder([""] * len(captions)),
                           model.config.sample_steps, model.config.cfg_scale, generator)
    real, generated = (frame_space.decode(ae.decode(content_frame, m)) for m in (motion_latent, motion))
    grid = rearrange(torch.cat([real, generated], dim=-1), "b l c h w -> l c (b h) w")
    write_video(path, video_to_uint8(grid.cpu()), fps=8)
    print(f"wrote {path} (AE reconstruction | generated motion), captions:", *captions, sep="\n  ")


def example_inputs(config, batch=1, text_len=77, device=None):
    """Random inputs of the right shapes: (z, t, content_frame, text_tokens, text_pooled)."""
    return (torch.randn(batch, config.frames, config.latent_h + config.latent_w, config.latent_dim, device=device),
            torch.randint(0, 1000, (batch,), device=device).float(),
            torch.randn(batch, config.frame_channels, config.frame_height, config.frame_width, device=device),
            torch.randn(batch, text_len, config.text_dim, device=device),
            torch.randn(batch, config.pooled_dim, device=device))


def training_step(config, device="meta", text_len=77, batch_size=1):
    """(model, loss()) of one training step on random inputs, built on `device`: what --flops counts and
    tools/bench.py times."""
    with torch.device(device):
        model = MotionDiT(config)
        z, _, *cond = example_inputs(config, batch_size, text_len)
    diffusion = Diffusion(prediction_type=config.prediction_type)
    return model, lambda: diffusion.loss(dit_model_fn(model), z, tuple(cond))


def load_motion(run_dir, device="cpu", ae_config=None):
    """A trained motion stage from a run directory -> (EMA DiT, Diffusion). With `ae_config`, the DiT
    takes that AE's shapes: its positions are sin-cos, the same weights fit."""
    info, state = load_stage(run_dir, "motion")
    config = MotionConfig(**info["config"]["model"])
    model = MotionDiT(replace(config, **shapes_from(ae_config)) if ae_config else config)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), Diffusion(**info["config"]["schedule"])


# -----------------------------------------------------------------------------
# Not the paper's method: the text tokens for a DiT whose pooled text says little (cross_attention,
# pool_text). They were added for a small open_clip tower with random weights (--text tiny), whose
# pooled feature hardly tells one direction word from another (docs/results.md); the bag of words
# gives one token, its pooled vector itself. With that one token the cross-attention is a learned bias a
# block and the pooling a second projection of the text, yet the tiny DiT keeps both: without them it drew
# the prompted shape less often and more second blobs of it (docs/results.md, 2026-12-08).

class AttentionPooling(nn.Module):
    """Text tokens (B, S, text_dim) -> one vector (B, hidden): a learned query attends over the
    tokens, so training decides which words the adaLN condition hears (as DeepFloyd IF's and
    diffusers' "text" time embedding does for a UNet)."""

    def __init__(self, text_dim, hidden, heads):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 1, hidden) * 0.02)
        self.attn = Attention(hidden, heads, context_dim=text_dim)

    def forward(self, tokens):
        return self.attn(self.query.expand(len(tokens), -1, -1), tokens)[:, 0]


if __name__ == "__main__":
    main()

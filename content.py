"""Stage 2 of CMD: content-frame diffusion (text -> content frame).

The autoencoder (ae.py) turns each video into a content frame, a weighted sum of its
frames that lives in the same space as one frame: an image (tiny and ucf presets) or a Stable
Diffusion latent (paper preset). Because it looks like an image, the paper generates it
by fine-tuning a pretrained text-to-image model, Stable Diffusion, with no new
parameters (CMD, arXiv 2403.14148, Sec. 3.2). This file holds, in reading order:

  1. the content model: Stable Diffusion's UNet (diffusers), fine-tuned as it is, reading the frozen
     OpenCLIP text encoder of SD 2.x (open_clip_torch),
  2. hand-written diffusion maths: noise schedule, training loss, DDIM sampler with
     classifier-free guidance. motion.py and sample.py reuse them, so they work on
     tensors of any shape (b ...), not only images; sampling content frames (Algorithm 1, step 2),
  3. the presets and the training main(),
  4. loaders: text encoders, a trained content stage, what stages 2 and 3 start from,
  5. not the paper's method: the models the tiny and ucf presets train from scratch (a UNet of SD's
     design, the prompt as a bag of words or a one-hot class),
  6. speed engineering: each DDIM step a CUDA graph.

Run it:
  python content.py                                      # tiny preset, shapes, CPU
  python content.py --preset ucf --data UCF-101/         # class-conditional UCF-101 from scratch, one GPU
  python content.py --preset paper --sd stable-diffusion-2-1-base --text-weights open_clip_vit_h14.bin \\
      --data webvid.csv --grad-accum 256 --grad-checkpointing      # one A100-80GB
  torchrun --nproc_per_node 8 content.py --preset paper --sd ... --text-weights ... --data webvid.csv
  python content.py --preset paper --flops [--resolution 256x512]  # parameters and FLOPs/step on `meta`
"""
import argparse
import json
import math
import os
import pickle
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn as nn
from diffusers import DDIMScheduler, UNet2DConditionModel
from einops import rearrange
from open_clip.transformer import TextTransformer
from safetensors.torch import load_file
from tqdm import tqdm

from ae import SD_MODEL, AEConfig, check_sd_folder, load_ae, preset_config
from data import (WORDS, add_latent_args, add_training_args, class_caption, encode_videos, fail, held_out_loss,
                  latent_data, listing_captions, load_stage, local_or_name, parse_stage_args, print_costs,
                  save_safetensors_atomic, setup_distributed, train, train_and_val_videos, video_to_uint8, write_image,
                  write_json_atomic)

# -----------------------------------------------------------------------------
# 1. The content model: Stable Diffusion's UNet, fine-tuned with no new parameters (Sec. 3.2)

def build_unet(config, frame_shape, text_width):
    """The UNet to train and its noise schedule: Stable Diffusion's, fine-tuned as it is with
    no new parameters (the paper), or one trained from scratch on pixel content frames (tiny, ucf)."""
    if config.sd is None:
        return scratch_unet(config.unet, text_width, frame_shape[1:], frame_shape[0]), config.schedule()
    unet, schedule = load_sd_unet(config.sd)
    check_unet_fits(unet.config, f"{config.sd} takes", frame_shape[0], text_width)
    return unet, schedule


def load_sd_unet(path_or_id):
    """Stable Diffusion's UNet and its training noise schedule, from a diffusers folder or hub id.

    Returns (unet, schedule) where schedule holds the keyword arguments of Diffusion.
    """
    check_sd_folder(path_or_id, ("unet", "scheduler"))
    try:
        unet = UNet2DConditionModel.from_pretrained(path_or_id, subfolder="unet", low_cpu_mem_usage=False)
        config = DDIMScheduler.load_config(path_or_id, subfolder="scheduler")
    except OSError as e:
        where = "local folder" if os.path.isdir(path_or_id) else "no local folder; Hugging Face hub"
        raise OSError(f"could not load Stable Diffusion from {path_or_id!r} ({where}): {e}") from e
    if config.get("beta_schedule") != "scaled_linear":
        raise ValueError(f"{path_or_id}: beta_schedule {config.get('beta_schedule')!r}; "
                         "Diffusion implements SD's 'scaled_linear' only")
    schedule = dict(prediction_type=config.get("prediction_type", "epsilon"),  # SD 1.x: no key
                    num_train_timesteps=config["num_train_timesteps"],
                    beta_start=config["beta_start"], beta_end=config["beta_end"],
                    steps_offset=config.get("steps_offset", 0),
                    rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
                    set_alpha_to_one=config.get("set_alpha_to_one", True))  # diffusers' default
    return unet, schedule


def check_unet_fits(unet_config, who, channels, text_width):
    """A UNet takes frames of one channel count and text tokens of one width: those of the AE and the text
    encoder it is used with, or a ValueError that says what differs."""
    if unet_config.in_channels != channels or unet_config.cross_attention_dim != text_width:
        raise ValueError(f"{who} {unet_config.in_channels}-channel frames and {unet_config.cross_attention_dim}-wide "
                         f"text tokens; the AE makes {channels}-channel frames and the text encoder {text_width}-wide "
                         "tokens")


def unet_model_fn(unet):
    """The UNet as a Diffusion model_fn(x, t, cond), cond = text tokens (B, S, width)."""
    return lambda x, t, tokens: unet(x, t, encoder_hidden_states=tokens).sample


# The text encoder: OpenCLIP's text tower, used the way Stable Diffusion 2.x uses it

class TextEncoder(nn.Module):
    """Frozen CLIP text tower: prompts -> (tokens (B, context, width), pooled (B, embed_dim)).

    tokens: output of the penultimate transformer block, then the final LayerNorm. This is
      what SD 2.x cross-attends to (its UNet was trained on exactly these features).
    pooled: the usual CLIP text embedding (last block, final LayerNorm, end-of-text token,
      text_projection). SD's UNet ignores it; the motion DiT uses it as a global condition.
    Only the text tower is built (no vision tower), straight from an open_clip model config.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config  # {"embed_dim": ..., "text_cfg": {...}}, as open_clip's model configs
        if config["text_cfg"]["layers"] < 2:
            raise ValueError("the text tower needs >= 2 layers: SD reads the penultimate one")
        self.text = TextTransformer(output_dim=config["embed_dim"], **config["text_cfg"])
        self.tokenizer = open_clip.SimpleTokenizer(context_length=self.text.context_length)
        self.width, self.embed_dim = self.text.width, config["embed_dim"]
        self.requires_grad_(False).eval()  # frozen, as when SD 2.x was trained

    def tokenize(self, prompts):
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {prompts!r}")
        n = self.text.context_length
        for p in prompts:
            if p and not p.strip():
                raise ValueError(f"blank prompt {p!r}: use '' for the unconditional prompt")
            length = len(self.tokenizer.encode(p)) + 2  # + start and end-of-text tokens
            if length > n:
                warnings.warn(f"prompt of {length} tokens truncated to {n}: {p[:60]!r}...")
        return self.tokenizer(prompts)  # (B, context) int64, zero-padded, truncated to the context

    @torch.no_grad()
    def forward(self, prompts):
        t = self.text
        ids = self.tokenize(prompts).to(t.positional_embedding.device)
        x = t.token_embedding(ids) + t.positional_embedding  # (B, context, width)
        for block in t.transformer.resblocks[:-1]:
            x = block(x, attn_mask=t.attn_mask)  # causal mask, as CLIP was trained
        tokens = t.ln_final(x)  # SD 2.x: layer="penultimate"
        x = t.ln_final(t.transformer.resblocks[-1](x, attn_mask=t.attn_mask))
        eot = ids.argmax(dim=-1)  # end-of-text has the largest id in CLIP's vocabulary
        pooled = x[torch.arange(len(ids), device=x.device), eot] @ t.text_projection
        return tokens, pooled


# -----------------------------------------------------------------------------
# 2. Diffusion maths, written out (DDPM: Ho et al. 2020; DDIM: Song et al. 2021)
#
# Glossary, names here -> symbols of the DDIM paper (whose alpha_t is DDPM's alpha-bar_t):
#   alphas_cumprod[t]  alpha_t          x_t = sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps
#   x0, eps            "predicted x_0" f(x_t) and eps_theta(x_t) of eq. 9 and 12
#   sigma              sigma_t of eq. 16, scaled by eta (eta=0: DDIM, eta=1: DDPM)
#   v                  v = sqrt(alpha_t) eps - sqrt(1 - alpha_t) x_0 (Salimans & Ho 2022),
#                      what SD 2.1 (768) predicts; SD 2.1-base and SD 1.x predict eps.
# Conditions ("cond") are a tensor or a tuple of tensors, each with the batch first.

@dataclass
class DiffusionConfig:
    """How a denoiser is trained and sampled: the content UNet (ContentConfig) and the motion DiT
    (motion.MotionConfig). Each preset's row (PRESETS) gives the values and says why."""
    # the network's target: "epsilon" or "v_prediction". A UNet fine-tuned from SD predicts what its
    # scheduler config says (load_sd_unet); from scratch, v stays a well-scaled target at both ends of
    # the schedule, where eps says nothing of x_0 at the noisy end
    prediction_type: str | None
    # SD's scaled-linear betas rescaled to zero terminal SNR (Diffusion, Lin et al. 2024): the noisiest
    # training steps are then pure noise, as is the noise that sampling starts from (which DDIM's leading
    # spacing labels t = 961 at 25 steps, not T), where SD's schedule keeps 7% of x_0 in x_T, enough to
    # carry a mean colour or a direction that a model learns to read off the noise instead of the prompt
    zero_terminal_snr: bool | None
    # Min-SNR-gamma loss weights (Diffusion.loss), or None for the plain loss
    snr_gamma: float | None
    cfg_scale: float   # classifier-free guidance of the samples (sample.py's default)
    sample_steps: int  # DDIM steps of the samples (sample.py's default)

    def schedule(self):
        """Diffusion's keywords for a model trained from scratch. Its last DDIM step goes to alpha = 1, the
        predicted x_0 itself (Diffusion's set_alpha_to_one)."""
        return {"prediction_type": self.prediction_type, "rescale_betas_zero_snr": self.zero_terminal_snr,
                "set_alpha_to_one": True}


class Diffusion:
    def __init__(self, prediction_type="epsilon", num_train_timesteps=1000,
                 beta_start=0.00085, beta_end=0.012, steps_offset=1, rescale_betas_zero_snr=False,
                 set_alpha_to_one=False):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError("prediction_type must be 'epsilon' or 'v_prediction', "
                             f"got {prediction_type!r}")
        if rescale_betas_zero_snr and prediction_type != "v_prediction":
            raise ValueError("rescale_betas_zero_snr needs v_prediction: at zero SNR x_T is pure "
                             "noise, and predicting that noise says nothing about x_0")
        self.prediction_type, self.steps_offset = prediction_type, steps_offset
        self.num_train_timesteps = T = num_train_timesteps
        # beta_t: SD's "scaled linear" schedule, linear in sqrt(beta) from beta_start to beta_end
        # (float64 as in the original latent-diffusion code, stored as float32)
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        # alpha_t (DDIM) = alpha-bar_t (DDPM) = prod_{s<=t} (1 - beta_s)
        alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        if rescale_betas_zero_snr:
            # Lin et al. 2024, Alg. 1: SD's schedule ends at alpha_T = 0.0047, so x_T in training still
            # holds sqrt(0.0047) = 7% of x_0, enough to carry an image's mean colour, which a model learns
            # to read off x_T, while sampling starts from pure noise. Shift and scale sqrt(alpha_t) so that
            # it ends at exactly 0 (x_T is pure noise in training too) and starts where it did. diffusers:
            # DDIMScheduler(rescale_betas_zero_snr=True); SD checkpoints fine-tuned this way say so in
            # their scheduler config (load_sd_unet).
            root = alphas_cumprod.sqrt()
            root = (root - root[-1]) * root[0] / (root[0] - root[-1])
            alphas_cumprod = root ** 2
        self.alphas_cumprod = alphas_cumprod.float()
        # alpha of the last DDIM step's target. SD's scheduler stops at alpha_0 (set_alpha_to_one=False),
        # which leaves sqrt(1 - alpha_0) = 3% of the predicted noise in the sample: invisible in SD's
        # latents, speckle on pixels. Models from scratch step to alpha = 1, the predicted x_0 itself.
        self.final_alpha = 1.0 if set_alpha_to_one else self.alphas_cumprod[0].item()
        self._alphas_cumprod_on = {}  # device -> a copy there, made once, not at every DDIM step

    def _at(self, t, x):
        """alphas_cumprod[t] (t: int or (B,) tensor on x's device), shaped to broadcast against x (B, ...)."""
        if x.device not in self._alphas_cumprod_on:
            self._alphas_cumprod_on[x.device] = self.alphas_cumprod.to(x.device)
        a = self._alphas_cumprod_on[x.device][t]
        return a.to(x.dtype).reshape(-1, *[1] * (x.ndim - 1))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0): sqrt(alpha_t) x_0 + sqrt(1 - alpha_t) eps (DDIM eq. 4)."""
        a = self._at(t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0, noise, t):
        """The network's regression target: eps, or v = sqrt(alpha_t) eps - sqrt(1-alpha_t) x_0."""
        if self.prediction_type == "epsilon":
            return noise
        a = self._at(t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def predict_x0_eps(self, model_output, x_t, t):
        """Model output at (x_t, t) -> (predicted x_0, predicted eps)."""
        a = self._at(t, x_t)
        if self.prediction_type == "epsilon":
            eps = model_output
            x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()  # DDIM eq. 9
        else:
            x0 = a.sqrt() * x_t - (1 - a).sqrt() * model_output
            eps = a.sqrt() * model_output + (1 - a).sqrt() * x_t
        return x0, eps

    def loss(self, model_fn, x0, cond, snr_gamma=None):
        """Simple diffusion loss (DDPM eq. 14, or its v form): MSE on the target at uniform t.

        snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023). Each sample's loss, seen as an error
        on x_0, is weighted by min(SNR_t, gamma), SNR_t = alpha_t / (1 - alpha_t), so that the many
        nearly noise-free timesteps stop dominating training. In terms of the target this is
        min(SNR, gamma) / SNR for epsilon and min(SNR, gamma) / (SNR + 1) for v. None: unweighted.
        """
        t = torch.randint(0, self.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0)
        prediction = model_fn(self.q_sample(x0, t, noise), t, cond)
        error = (prediction.float() - self.training_target(x0, noise, t).float()) ** 2
        if snr_gamma is None:
            return error.mean()
        a = self._at(t, error)
        snr = a / (1 - a)
        weight = snr.clamp(max=snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else snr)
        return (weight * error).mean()

    def ddim_timesteps(self, steps):
        """SD's "leading" spacing: steps_offset + [0, T/steps, 2T/steps, ...], reversed."""
        if not 0 < steps < self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}), got {steps}")
        ratio = self.num_train_timesteps // steps
        return [i * ratio + self.steps_offset for i in reversed(range(steps))]

    def ddim_step(self, model_output, t, x_t, steps, eta=0.0, noise=None):
        """One DDIM update x_t -> x_{t-1} (DDIM eq. 12); noise ~ N(0, I) is needed when eta > 0."""
        # 1. previous timestep: one stride of the `steps`-step schedule back
        prev_t = t - self.num_train_timesteps // steps
        # 2. alpha_t and alpha_{t-1}; the last step goes to final_alpha
        a_t = self.alphas_cumprod[t].item()
        a_prev = self.alphas_cumprod[prev_t].item() if prev_t >= 0 else self.final_alpha
        # 3. predicted x_0 ("predicted x_0" term of eq. 12) and eps; SD samples without clipping x_0
        x0, eps = self.predict_x0_eps(model_output.float(), x_t, t)
        # 4. sigma_t (eq. 16) = eta sqrt((1-alpha_{t-1})/(1-alpha_t)) sqrt(1-alpha_t/alpha_{t-1})
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        # 5. "direction pointing to x_t" of eq. 12
        direction = (1 - a_prev - sigma ** 2) ** 0.5 * eps
        # 6. x_{t-1} = sqrt(alpha_{t-1}) * predicted x_0 + direction + sigma_t * noise (eq. 12)
        x_prev = a_prev ** 0.5 * x0 + direction
        if eta > 0:
            x_prev = x_prev + sigma * noise
        return x_prev

    @torch.no_grad()
    def ddim_sample(self, model_fn, shape, cond, uncond=None, steps=50, cfg_scale=1.0,
                    eta=0.0, generator=None, progress=True, desc="DDIM", cuda_graph=True):
        """Sample x_0 of `shape` from x_T ~ N(0, I) with DDIM and classifier-free guidance.

        model_fn(x, t, cond) -> model output. cond and uncond (e.g. the features of "") have the
        same structure and batch size. `generator`, if given, lives on cond's device.
        `desc` labels the progress bar. On a GPU the guided prediction is a CUDA graph (cuda_graphed).
        """
        device = (cond if torch.is_tensor(cond) else cond[0]).device
        if cfg_scale == 1.0:
            uncond = None  # no guidance: skip the unconditional half of the batch
        x = torch.randn(shape, generator=generator, device=device)

        def guided(x, t_batch):
            return cfg_output(model_fn, x, t_batch, cond, uncond, cfg_scale)
        if cuda_graph and device.type == "cuda":
            guided = cuda_graphed(guided, x, torch.zeros(shape[0], dtype=torch.long, device=device))
        for t in tqdm(self.ddim_timesteps(steps), desc=desc, disable=not progress):
            output = guided(x, torch.full((shape[0],), t, device=device))
            noise = torch.randn(shape, generator=generator, device=device) if eta > 0 else None
            x = self.ddim_step(output, t, x, steps, eta, noise)
        return x


def _cat(a, b):
    """Concatenate two conditions (a tensor, or a tuple of tensors) along the batch."""
    if torch.is_tensor(a):
        return torch.cat([a, b])
    return tuple(torch.cat([p, q]) for p, q in zip(a, b, strict=True))


def cfg_output(model_fn, x, t, cond, uncond, scale):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond).

    Both predictions come from one forward pass on the doubled batch.
    """
    if uncond is None:
        return model_fn(x, t, cond)
    both = model_fn(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, uncond))
    out_cond, out_uncond = both.chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)


def drop_prompts(prompts, p=0.1, generator=None):
    """Replace each prompt by "" with probability p (the usual 10%, Ho & Salimans 2022), so one
    network also learns the unconditional prediction that classifier-free guidance needs."""
    keep = torch.rand(len(prompts), generator=generator) >= p
    return [prompt if k else "" for prompt, k in zip(prompts, keep)]


@torch.no_grad()
def sample_content_frames(unet, diffusion, tokens, null_tokens, shape, steps, cfg_scale, generator=None,
                          progress=True, cuda_graph=True):
    """Algorithm 1, step 2: content frames x̄_0 (B, *shape) from x̄_T ~ N(0, I) by guided DDIM on the UNet,
    given the text tokens (B, S, width) of the prompts and of "" (the unconditional branch)."""
    return diffusion.ddim_sample(unet_model_fn(unet), (len(tokens), *shape), tokens, null_tokens, steps=steps,
                                 cfg_scale=cfg_scale, generator=generator, progress=progress, desc="content",
                                 cuda_graph=cuda_graph)


# -----------------------------------------------------------------------------
# 3. The presets and training: fine-tune (paper) or train (tiny, ucf) the UNet on the AE's content frames

@dataclass
class ContentConfig(DiffusionConfig):
    # "words" or "classes" (BagOfWords), "tiny" (a small open_clip tower, random), an open_clip model name or .json
    text: str
    text_pretrained: str | None  # open_clip pretrained tag (needs network)
    sd: str | None   # SD folder or hub id to fine-tune; None: a UNet from scratch, of this shape:
    unet: dict | None  # scratch_unet's widths a level, ResNet blocks a level, levels with attention


# One row per preset: the content model (ContentConfig's fields) and its training flags
# (data.add_training_args), with their sources.
PRESETS = {
    # Sized for the shapes world on a laptop CPU, with the latent cache (docs/results.md has the runs). The
    # prompt as a bag of words (BagOfWords); a UNet of SD's design from scratch, v on the zero-terminal-SNR
    # schedule with Min-SNR-20 weights: with v there a step's weight is min(SNR, gamma) / (SNR + 1), so the
    # plain loss (gamma = inf) leaves the noisiest steps, which set the layout, almost untrained, and a small
    # gamma the cleanest, which draw the edges; 20 trains both. Guidance 2: at 3 the content frame drew
    # strays of the shape's colour that the decoder turns into second blobs away from the middle frame;
    # 25 DDIM steps, as good as 50 on the shapes world. Batch 16 for more steps learned the shapes better
    # than batch 32, lr 2e-3 better than 1e-3; 2,800 steps, as the validation loss still fell at 2,200; no
    # weight averaging: an EMA of 0.999 scored within the noise of none (docs/results.md).
    "tiny": dict(data="shapes", cache=True, every=500, text="words", text_pretrained=None, sd=None,
                 unet=dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, attention_levels=2),
                 prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=20.0, cfg_scale=2.0, sample_steps=25,
                 steps=2800, batch_size=16, lr=2e-3, decay="cosine", betas=(0.9, 0.99), ema_decay=0.0),
    # The paper fine-tunes SD 2.1-base (App. B.3) with its text encoder, OpenCLIP ViT-H-14 trained on LAION-2B,
    # with the plain loss; SD's scheduler config decides the target and schedule. It guides with w = 7.5
    # and samples 50 DDIM steps (App. B.4). Fine-tuning SD 2.x in full, as is common practice (the release has
    # no SD fine-tuning): lr 1e-5 after 500 warm-up steps, AdamW betas (0.9, 0.999), weight decay 1e-2,
    # gradient clip 1, EMA 0.9999; the paper's batch of 256: 1 x 32 accumulated x 8 GPUs. The step count is
    # not given; 50k steps of 256 is ours.
    "paper": dict(data=None, cache=False, every=2000, text="ViT-H-14", text_pretrained="laion2b_s32b_b79k",
                  sd=SD_MODEL, unet=None, prediction_type=None, zero_terminal_snr=None, snr_gamma=None,
                  cfg_scale=7.5, sample_steps=50,
                  steps=50_000, batch_size=1, grad_accum=32, lr=1e-5, warmup=500, weight_decay=1e-2),
    # Class-conditional UCF-101 from scratch, as the release (train_content_diffusion.py), which guides with
    # 4.0 and samples 50 ancestral steps on linear betas, predicting eps with a learned sigma. Ours: a UNet of
    # ADM's size for 64 x 64 ImageNet (Dhariwal & Nichol 2021: widths 192 x (1, 2, 3, 4), 3 blocks, attention
    # at 32, 16 and 8) for the release's ContentDiT-L/2, about its size (DiT-L/2: 458 M parameters) at a
    # third of its FLOPs at 64 x 64 (1,024 tokens of width 1,024 in 24 blocks), which one GPU feels; the
    # class one-hot (BagOfWords); v on the zero-terminal-SNR schedule as the tiny preset (on pixels SD's own
    # schedule keeps 7% of x_0 in x_T), the plain loss as the release, DDIM. The release's optimiser: AdamW
    # lr 1e-4, no weight decay, no gradient clipping, EMA 0.9999, for its 1,400 epochs of trainlist01's 9,537
    # videos at 256: 52k steps; 64 a GPU fits 80 GB.
    "ucf": dict(data=None, cache=False, every=2000, text="classes", text_pretrained=None, sd=None,
                unet=dict(block_out_channels=(192, 384, 576, 768), layers_per_block=3, attention_levels=3),
                prediction_type="v_prediction", zero_terminal_snr=True, snr_gamma=None, cfg_scale=4.0, sample_steps=50,
                steps=52_000, batch_size=64, grad_accum=4, lr=1e-4, grad_clip=0.0),
}


def content_config(preset, **flags):
    """The ContentConfig of a preset's row, `flags` (the command line's) in place of its values."""
    values = {**PRESETS[preset], **flags}
    return ContentConfig(**{name: values[name] for name in ContentConfig.__dataclass_fields__})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=PRESETS)
    parser.add_argument("--sd", type=local_or_name, help="Stable Diffusion folder or hub id (its unet/ and scheduler/)")
    parser.add_argument("--size", choices=[p for p in PRESETS if PRESETS[p]["unet"]],
                        help="train the UNet from scratch of this preset's row instead")
    add_latent_args(parser)
    add_training_args(parser)
    args = parse_stage_args(parser, "content", PRESETS, argv)
    config = content_config(args.preset, text=args.text, sd=args.sd, snr_gamma=args.snr_gamma,
                            unet=PRESETS[args.size or args.preset]["unet"])
    if args.flops:  # on `meta`, at the sizes of --ae's run or of the preset
        try:
            frames, text = flops_sizes(args, config.text)
        except (OSError, ValueError) as e:
            fail(e)
        tokens, width, _ = text_shapes(text)
        shape = (frames.channels, frames.height, frames.width)
        with torch.device("meta"):
            unet = (UNet2DConditionModel(**SD21_UNET_CONFIG) if config.sd
                    else scratch_unet(config.unet, width, shape[1:], shape[0]))
        return print_costs("content UNet", unet, training_step(unet, shape, (tokens, width)),
                           f"batch 1, {' x '.join(map(str, shape))} content frames")
    rank, device, text_encoder, ae, frame_space, dataset, val_batch = latent_stage(args, config.text,
                                                                                   config.text_pretrained)
    shape = (ae.config.channels, ae.config.height, ae.config.width)
    torch.manual_seed(args.seed)  # the initial weights too: one --seed, one run
    try:
        unet, schedule = build_unet(config, shape, text_encoder.width)
    except (OSError, ValueError) as e:
        fail(e)
    diffusion = Diffusion(**schedule)

    def loss_fn(model, batch):
        content_frame, _, captions = encode_videos(ae, frame_space, batch)
        tokens = text_encoder(drop_prompts(captions))[0]  # guidance: some prompts become ""
        return diffusion.loss(unet_model_fn(model), content_frame, tokens, config.snr_gamma)

    run_config = {"content": asdict(config), "unet": dict(unet.config), "schedule": schedule,
                  "text_weights": args.text_weights}
    ema = train("content", unet, loss_fn, dataset, args, run_config, held_out_loss(loss_fn, val_batch))
    if rank == 0:  # under torchrun, one process samples the grid
        prompts = SHOWCASE_PROMPTS if args.data == "shapes" else val_batch[2][:12]
        tokens, null_tokens = text_encoder(prompts)[0], text_encoder([""] * len(prompts))[0]
        frames = sample_content_frames(ema, diffusion, tokens, null_tokens, shape, config.sample_steps,
                                       config.cfg_scale, torch.Generator(device).manual_seed(0))
        images = frame_space.decode(frames[:, None])[:, 0]  # (n, 3, H, W) pixels
        path = Path(args.out) / "content-samples.png"
        columns = 3 if len(images) % 3 == 0 else 1
        write_image(path, video_to_uint8(rearrange(images, "(row col) c h w -> c (row h) (col w)", col=columns)))
        print(f"wrote {path}:", "rows red, green, blue, yellow; columns circle, square, triangle"
              if args.data == "shapes" else "held-out captions " + "; ".join(prompts))


def training_step(unet, frame_shape, text_shape, device="meta", batch_size=1):
    """loss() of one training step of `unet` on random content frames (C, H, W) and text tokens
    (S, width), made on `device`: what --flops counts and tools/bench.py times."""
    with torch.device(device):
        frames, tokens = torch.randn(batch_size, *frame_shape), torch.randn(batch_size, *text_shape)
    diffusion = Diffusion(prediction_type="v_prediction")
    return lambda: diffusion.loss(unet_model_fn(unet), frames, tokens)


def text_shapes(config):
    """(tokens per prompt, their width, the pooled width) of a text encoder, from its config (a run's
    text_encoder.json, or flops_sizes' assumption), without building it: what --flops needs."""
    if "words" in config or "classes" in config:
        entries = len(config.get("words") or config["classes"])
        return 1, entries, entries
    return config["text_cfg"]["context_length"], config["text_cfg"]["width"], config["embed_dim"]


def flops_sizes(args, text):
    """The sizes --flops counts at, said in one line -> (AE config, text encoder config): those of the run
    --ae names (its AE, and its text encoder once stage 2 has saved it there), or else the preset's AE at
    --resolution and the text encoder `text` (a bag of words: the shapes world's)."""
    saved = Path(args.ae or "", "text_encoder.json")
    if args.ae and saved.is_file():
        te_config, text_said = json.loads(saved.read_text()), f"its text encoder ({saved})"
    elif text in ("words", "classes"):
        te_config = {"words": WORDS} if text == "words" else {"classes": [f"class {k}" for k in range(101)]}
        text_said = ("a bag of the shapes world's 24 words" if text == "words" else "UCF-101's 101 classes, one-hot")
    else:
        te_config, text_said = text_config(text), f"the text encoder {text}"
    if args.ae:
        ae_config = AEConfig(**load_stage(args.ae, "ae")[0]["config"])
        print(f"sizes of the run {args.ae}: its AE ({' x '.join(map(str, ae_config.video_size))} videos), {text_said}")
    else:
        ae_config = preset_config(args.preset, args.resolution)
        print(f"sizes assumed (no --ae run named): the {args.preset} preset's AE at "
              f"{'x'.join(map(str, ae_config.video_size))}, {text_said}")
    return ae_config, te_config


# Stable Diffusion 2.1's UNet (unet/config.json of stabilityai/stable-diffusion-2-1), so the full model
# builds on the `meta` device without a download (--flops, tools/bench.py): 865,910,724 parameters.
SD21_UNET_CONFIG = dict(
    sample_size=96,  # 768 px / 8; the UNet is convolutional, the paper runs it at 64x128
    in_channels=4, out_channels=4,  # SD-VAE latents
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    attention_head_dim=(5, 10, 20, 20),  # diffusers' historical name: the number of heads
    cross_attention_dim=1024,  # = OpenCLIP ViT-H/14 text width
    use_linear_projection=True, upcast_attention=True,
)


# Shrinking shapes: their content frame is the shape itself with soft edges, where a moving
# shape's is a smear along its path and a rotating one's a disc (the weighted sum of Eq. 2).
SHOWCASE_PROMPTS = [f"a {color} {shape} shrinking on a dark background"
                    for color in ("red", "green", "blue", "yellow") for shape in ("circle", "square", "triangle")]


# -----------------------------------------------------------------------------
# 4. Loaders: text encoders, a trained content stage, what stages 2 and 3 start from

def load_open_clip_text_weights(te, path):
    """Fill te's text tower from an open_clip checkpoint file (.bin/.pt/.safetensors)."""
    try:  # open_clip's loader unwraps {"state_dict": ...} and DDP's "module." prefixes
        state = open_clip.factory.load_state_dict(str(path))
    except (RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is not an open_clip checkpoint that torch can read ({str(e).splitlines()[0]})") from e
    # CLIP checkpoints (ViT-H-14) keep the text tower at the top level, next to "visual.*";
    # CustomTextCLIP ones put it under "text.".
    state = {k.removeprefix("text."): v for k, v in state.items()}
    wanted = te.text.state_dict()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(f"{path} holds no open_clip text tower of this config: "
                         f"missing {missing[:4]} ({len(missing)} keys)")
    other = [f"{k} {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in wanted.items()
             if state[k].shape != v.shape]
    if other:
        raise ValueError(f"{path} holds the text tower of another model ({other[0]}, and {len(other) - 1} more): "
                         "pass the --text model it belongs to")
    te.text.load_state_dict({k: state[k] for k in wanted})
    return te


def text_config(name):
    """The open_clip model config of a text encoder: 'tiny', an open_clip model name, or a model-config .json."""
    if name == "tiny":
        return TINY_TEXT_CONFIG
    config = json.loads(Path(name).read_text()) if name.endswith(".json") else open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip model {name!r}: give a name open_clip knows, or a model-config .json")
    return config


def build_text_encoder(name="tiny", weights=None, pretrained=None, seed=0):
    """'tiny': a random frozen tower (fixed seed). Otherwise an open_clip model name (paper:
    'ViT-H-14') or an open_clip model-config .json file, loaded from a local checkpoint `weights`,
    or downloaded by open_clip from its `pretrained` tag (e.g. 'laion2b_s32b_b79k', the one SD 2.x
    was trained with)."""
    if name == "tiny":
        with torch.random.fork_rng(devices=[]):  # same weights every time, global RNG untouched
            torch.manual_seed(seed)
            return TextEncoder(TINY_TEXT_CONFIG)
    config = text_config(name)
    if pretrained:
        tag = open_clip.get_pretrained_cfg(name, pretrained)
        if not tag:
            raise ValueError(f"open_clip has no pretrained {pretrained!r} for {name}; it has "
                             f"{open_clip.list_pretrained_tags_by_model(name)}")
        weights = open_clip.download_pretrained(tag)
    if weights is None:
        raise ValueError(f"{name} needs weights: a local open_clip checkpoint (--text-weights) "
                         "or an open_clip pretrained tag (needs network)")
    return load_open_clip_text_weights(TextEncoder(config), weights)


def save_text_encoder(te, run_dir):
    """Config (and a text tower's weights) into run_dir, so the run reloads the exact same text features."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # Weights first: text_encoder_for_run takes the json's presence to mean the pair is complete
    # (under torchrun every rank builds the same seeded encoder, and one may read what another saves).
    if isinstance(te, TextEncoder):
        save_safetensors_atomic(run_dir / "text_encoder.safetensors", te.text.state_dict())
    write_json_atomic(run_dir / "text_encoder.json", te.config)


def load_text_encoder(run_dir, skip_unknown=False):
    """The text encoder saved in a run (skip_unknown: BagOfWords')."""
    config_path, weights_path = Path(run_dir) / "text_encoder.json", Path(run_dir) / "text_encoder.safetensors"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if "classes" in config or "words" in config:
        return BagOfWords(config, skip_unknown)
    if not (config and weights_path.is_file()):
        raise FileNotFoundError(f"{run_dir} has no saved text encoder (text_encoder.json + text_encoder.safetensors)")
    te = TextEncoder(config)
    te.text.load_state_dict(load_file(weights_path))
    return te


# Text encoders that exist only in their run: the random tiny tower, and BagOfWords' words or classes.
# Training saves them into the run directory once; every later stage and sample.py reloads them there.
SAVED_IN_RUN = ("tiny", "words", "classes")


def text_encoder_for_run(run_dir, text, pretrained=None, text_weights=None, captions=()):
    """The text encoder `text` (ContentConfig.text) that stages 2 and 3 train with, shared through the run
    (SAVED_IN_RUN: made and saved the first time). A bag of words or classes is made from `captions`, every
    caption of the listing, training and held-out alike, so that a held-out video's caption is known too."""
    if (Path(run_dir) / "text_encoder.json").is_file():
        return load_text_encoder(run_dir, skip_unknown=True)
    if text == "words":
        words, dropped = word_vocabulary(captions)
        if dropped:
            print(f"warning: the captions hold {len(words) + dropped:,} different words; the bag of words keeps "
                  f"the {len(words):,} most frequent and drops {dropped:,} rarer ones, which training skips")
        te = BagOfWords({"words": words}, skip_unknown=True)
    elif text == "classes":
        te = BagOfWords({"classes": sorted({class_caption(caption) for caption in captions})})
    else:
        te = build_text_encoder(text, weights=text_weights, pretrained=None if text_weights else pretrained)
    if text in SAVED_IN_RUN:
        save_text_encoder(te, run_dir)
    return te


def load_content(run_dir, device="cpu", text_weights=None):
    """A trained content stage from a run directory -> (text encoder, EMA UNet, Diffusion, config)."""
    info, state = load_stage(run_dir, "content")
    config = ContentConfig(**info["config"]["content"])
    unet = UNet2DConditionModel.from_config(info["config"]["unet"])
    unet.load_state_dict(state)
    if config.text in SAVED_IN_RUN:  # loading never writes into the run
        try:
            te = load_text_encoder(run_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{run_dir} is incomplete: its content stage was trained with the text encoder "
                                    f"that training saves into the run ({e}); copy it from the run it was trained "
                                    "in, or train this stage again") from e
    else:
        te = text_encoder_for_run(run_dir, config.text, config.text_pretrained,
                                  text_weights or info["config"].get("text_weights"))
    diffusion = Diffusion(**info["config"]["schedule"])
    return te.to(device), unet.to(device).eval().requires_grad_(False), diffusion, config


def latent_stage(args, text, text_pretrained=None):
    """What stages 2 and 3 start from: (rank, device, the run's text encoder (`text`, text_encoder_for_run),
    the frozen AE and its frame space, the training data and a held-out batch of latent_data). A bad input
    is a one-line error."""
    try:
        rank, _, device = setup_distributed()
        ae, frame_space = load_ae(args.ae or args.out, device)
        dataset, val_set = train_and_val_videos(args, ae.config.frames, ae.config.video_size)
        if text == "classes" and not hasattr(dataset, "items"):
            raise ValueError(f"the {args.preset} preset learns the classes of listed videos: --data wants a folder "
                             "of class folders (UCF-101) or a CSV of path,class")
        captions = listing_captions(dataset) + listing_captions(val_set)
        text_encoder = text_encoder_for_run(args.out, text, text_pretrained, args.text_weights, captions)
        text_encoder = text_encoder.to(device)
        if rank == 0 and isinstance(text_encoder, BagOfWords):
            print(describe_vocabulary(text_encoder, listing_captions(dataset), Path(args.out) / "text_encoder.json"))
        dataset, val_batch = latent_data(args, ae, frame_space, dataset, val_set, device)
    except (OSError, ValueError, RuntimeError) as e:
        fail(e)
    return rank, device, text_encoder, ae, frame_space, dataset, val_batch


def describe_vocabulary(bag, training_captions, path, shown=40):
    """One line: what a BagOfWords knows, and the classes no training video shows (held out only)."""
    entries = bag.config[bag.kind]
    line = f"text: a bag of {len(entries)} {bag.kind} ({path}): {', '.join(entries[:shown])}"
    line += f", ... ({len(entries) - shown} more)" if len(entries) > shown else ""
    if bag.kind == "classes":
        trained = {class_caption(caption) for caption in training_captions}
        unseen = [entry for entry in entries if entry not in trained]
        line += f"; no training video of {len(unseen)}: {', '.join(unseen)}" if unseen else ""
    return line


# -----------------------------------------------------------------------------
# 5. Not the paper's method: what the tiny and ucf presets train from scratch, a UNet of SD's design and
# the prompt as a bag of words (or the class one-hot), and a small open_clip tower (--text tiny)

def scratch_unet(shape, cross_attention_dim, sample_size=32, in_channels=3):
    """A UNet of SD's design, trained from scratch on pixel content frames: `shape` is a PRESETS row's
    `unet`, its block widths, ResNet blocks a level, and the levels with attention (self-attention, then
    cross-attention to the text or class)."""
    widths, levels = shape["block_out_channels"], shape["attention_levels"]
    down = ("DownBlock2D",) * (len(widths) - levels) + ("CrossAttnDownBlock2D",) * levels  # attention where coarse
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels, block_out_channels=widths,
        layers_per_block=shape["layers_per_block"], norm_num_groups=min(32, widths[0] // 2),
        down_block_types=down, up_block_types=tuple(block.replace("Down", "Up") for block in reversed(down)),
        attention_head_dim=8,  # 8 heads (see SD21_UNET_CONFIG)
        cross_attention_dim=cross_attention_dim,
        # The prompt also enters globally, as in DeepFloyd IF: the text tokens, attention-pooled
        # into one vector, are added to the timestep embedding of every block, so a small UNet
        # hears the prompt early in training (README). SD's UNet has no such input.
        addition_embed_type="text", addition_embed_type_num_heads=math.gcd(4, cross_attention_dim),  # 4 that divide
        # ... and that embedding scales and shifts each ResNet block's normalised features (ADM's
        # AdaGN, Dhariwal & Nichol 2021) instead of adding a bias to them: the prompt can switch
        # features on and off, and the tiny UNet learns which shape a prompt names within its
        # steps far more often (docs/results.md). SD's UNet only adds.
        resnet_time_scale_shift="scale_shift",
    )


# Same format as open_clip.get_model_config("ViT-H-14"), at toy size. The vocabulary stays
# CLIP's (49408) because the tokenizer is CLIP's. The context is 24 tokens, not the 77 that SD
# expects: a shapes caption takes at most 18, and the cross-attention of the UNet and the DiT (a
# softmax over every token) would otherwise spread over some 60 padding tokens that barely
# differ from prompt to prompt, diluting the one word that names the shape or the direction.
TINY_TEXT_CONFIG = {"embed_dim": 64,
                    "text_cfg": {"context_length": 24, "vocab_size": 49408,
                                 "width": 64, "heads": 4, "layers": 2}}


def caption_words(text):
    """'TV color bars, "broadcast" test; static' -> ['tv', 'color', 'bars', 'broadcast', 'test', 'static']: the
    words of a caption or prompt, lower-cased, the punctuation between them split off and dropped. One rule
    for the training captions and for the prompts at sampling."""
    return re.findall(r"\w+", text.lower())


MAX_WORDS = 1000  # the bag of words' widest vocabulary: its first layer reads one input per word


def word_vocabulary(captions, limit=MAX_WORDS):
    """The vocabulary of a BagOfWords: the words of the captions, the `limit` most frequent of them,
    sorted -> (vocabulary, how many rarer words were dropped)."""
    counts = Counter(word for caption in captions for word in caption_words(caption))
    if not counts:
        raise ValueError("the captions hold no words, and the bag of words reads words: caption the videos, "
                         "or train another text encoder (--text tiny)")
    kept = sorted(counts, key=lambda word: (-counts[word], word))[:limit]  # ties: alphabetical, so runs agree
    return sorted(kept), len(counts) - len(kept)


class BagOfWords(nn.Module):
    """A fixed encoding of the prompt a reader can check, for models trained from scratch: a vector over
    a vocabulary, 1 for each entry the prompt holds, as tokens (B, 1, V) and as pooled (B, V); "" is all
    zeros, the null prompt of classifier-free guidance. The first linear layer that reads it adds up a
    learned vector per entry. The tiny preset's vocabulary is the words of its listing's captions
    (word_vocabulary; the shapes world's are data.WORDS): a caption is its words without their order.
    The ucf preset's is its listing's classes, and a prompt is one class, named as its folder
    (ApplyEyeMakeup) or in words (apply eye makeup): a one-hot class, so that layer is a class table, as
    DiT's LabelEmbedder. A prompt with a word or class the run does not know is a ValueError; in
    training (skip_unknown) a caption's words that the vocabulary's cap dropped are skipped instead."""

    def __init__(self, config, skip_unknown=False):
        super().__init__()
        self.config = config  # {"words": [...]} or {"classes": [...]}, sorted
        self.kind = "classes" if "classes" in config else "words"
        self.index = {entry: k for k, entry in enumerate(config[self.kind])}
        self.width = self.embed_dim = len(self.index)
        self.skip_unknown = skip_unknown and self.kind == "words"
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # moves with .to(): where vectors go

    def entries(self, prompt):
        if self.kind == "classes":
            return [class_caption(prompt)] if prompt else []
        return caption_words(prompt)

    def forward(self, prompts):
        vectors = torch.zeros(len(prompts), self.width, device=self.anchor.device)
        for row, prompt in enumerate(prompts):
            entries = self.entries(prompt)
            if not self.skip_unknown:
                self.check(prompt, entries)
            vectors[row, [self.index[entry] for entry in entries if entry in self.index]] = 1
        return vectors[:, None], vectors

    def check(self, prompt, entries):
        one = {"words": "word", "classes": "class"}[self.kind]
        if prompt and not entries:
            raise ValueError(f"the prompt {prompt!r} holds no {one}: use '' for the unconditional prompt")
        unknown = [entry for entry in entries if entry not in self.index]
        if unknown:
            known = self.config[self.kind]
            raise ValueError(f"unknown {one} {unknown[0]!r} in {prompt!r}: this run knows {len(known)} "
                             f"{self.kind}: {', '.join(known[:24])}{', ...' if len(known) > 24 else ''}")


# -----------------------------------------------------------------------------
# 6. Speed engineering: each DDIM step a CUDA graph (on a GPU)

def cuda_graphed(fn, *inputs):
    """fn, recorded once as a CUDA graph on example inputs, then replayed: each call copies its inputs into
    the recorded ones and relaunches the recorded kernels at once. A DDIM step of a small batch (a 512-token
    DiT, SD at 64 x 128) otherwise waits on Python and on thousands of kernel launches. Calls keep the
    example's shapes, and fn must not wait on the GPU (no .item() on its tensors)."""
    static = [x.clone() for x in inputs]
    side = torch.cuda.Stream()  # warm up off the main stream, as torch.cuda.graph wants
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # cuBLAS and cuDNN pick their kernels, the allocator its blocks
            fn(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = fn(*static)

    def replay(*args):
        for recorded, new in zip(static, args):
            recorded.copy_(new)
        graph.replay()
        return output.clone()  # the next replay overwrites `output`
    return replay


if __name__ == "__main__":
    main()

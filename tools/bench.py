"""The paper's cost tables (Section 5, Tables 8 and 9), reproduced at the paper's scale.

Sampling one 16-frame 512x1024 video (50 DDIM steps with guidance) and one training step on
16-frame 512x512 videos, for CMD, ModelScope's text-to-video architecture and frame-by-frame
Stable Diffusion, with random weights at the real sizes:
  * FLOPs, always: counted on the `meta` device (nothing allocated, about a minute on a CPU),
  * seconds and peak memory, on a GPU: bf16, one warm-up, median of 3 runs.
CMD's sampling runs sample.generate, the same Algorithm 1 that sample.py runs; the baselines get
what it gets (CUDA graphs, the SD VAE decoding frames in batches), so the ratio stays fair.
--profile takes Algorithm 1 apart at any preset, on a CPU too: seconds, FLOPs and TFLOP/s of a call
of each part (text encoder, a content UNet step, a DiT step, the AE and SD VAE decoders).

    python tools/bench.py                        # FLOPs tables, and the JSON line last
    python tools/bench.py --device cuda          # + seconds and peak memory
    python tools/bench.py --device cuda --eager  # ... each DDIM step launched from Python, a frame at a time
    python tools/bench.py --device cuda --compile  # the denoisers and training steps under torch.compile
    python tools/bench.py --profile --preset tiny --device cpu   # where the time goes
    python tools/bench.py --profile --device cuda --steps 25     # the paper preset, 25 + 25 steps
"""
import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel, UNet3DConditionModel
from einops import rearrange

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stage files live one folder up
import ae  # noqa: E402
import content  # noqa: E402
import motion  # noqa: E402
from content import SD21_UNET_CONFIG, Diffusion, unet_model_fn  # noqa: E402
from data import WORDS, count_flops, parse_resolution  # noqa: E402
from motion import MotionDiT, dit_model_fn, example_inputs, shapes_from  # noqa: E402
from sample import Models, generate  # noqa: E402

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
# 64x128 latents (sampling, Table 9); 512x512 -> 64x64 (training, Table 8): configs_at sizes the AE
# preset and the DiT to fit.
PAPER_SETUP = dict(
    unet=SD21_UNET_CONFIG, unet3d=MODELSCOPE_UNET_CONFIG, vae=SD21_VAE_CONFIG,
    ae=ae.preset_config("paper"), motion=motion.config_for("paper", None, ae.preset_config("paper"), (1024, 1024)),
    sample_latent=(64, 128), train_latent=(64, 64), content_steps=50, motion_steps=50, text_len=77, cfg_scale=7.5,
    frames_at_once=ae.FrameSpace().frames_at_once,  # the SD VAE's batch of frames, as sample.py decodes
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


def configs_at(setup, latent_size):
    """(AEConfig, MotionConfig) for frames of latent_size (h, w): the DiT takes the AE's shapes, as
    motion.config_for does for a trained AE."""
    ae_config = replace(setup["ae"], height=latent_size[0], width=latent_size[1])
    return ae_config, replace(setup["motion"], **shapes_from(ae_config))


def build(setup, names, latent_size, device, dtype=torch.float32):
    """Random-weight networks by name, built straight on `device` ("meta": shapes only)."""
    ae_config, motion_config = configs_at(setup, latent_size)
    make = {"unet": lambda: UNet2DConditionModel(**setup["unet"]),
            "unet3d": lambda: UNet3DConditionModel(**setup["unet3d"]),
            "vae": lambda: AutoencoderKL(**setup["vae"]),
            "ae": lambda: ae.Autoencoder(ae_config),
            "dit": lambda: MotionDiT(motion_config)}
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
    steps: every step costs the same, and the DDIM update (elementwise) counts as 0. ModelScope
    and frame-wise SD, one diffusion each, take the content stage's steps."""
    nets = build(setup, ("unet", "unet3d", "vae", "ae", "dit"), setup["sample_latent"], "meta")
    a = nets["ae"].config
    L, C, H, W = a.frames, a.channels, a.height, a.width
    steps, motion_steps = setup["content_steps"], setup["motion_steps"]
    count = count_flops
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
        vae = count(lambda: nets["vae"].decode(content_frame))  # per frame: the same in any batch
    decode = Part(f"SD VAE decoder, {L} frames", L, *vae, sd_decode=True)
    return {"CMD": [Part("content UNet (SD 2.1), CFG batch 2", steps, *unet, cfg=2),
                    Part("motion DiT, CFG batch 2", motion_steps, *dit, cfg=2),
                    Part("AE decoder, batch 1", 1, *ae_decoder), decode],
            "ModelScope": [Part(f"3D UNet on {L} frames, CFG batch 2", steps, *unet3d, cfg=2), decode],
            "frame-wise SD": [Part(f"SD 2.1 UNet on {L} frames, CFG batch 2 x {L}", steps, *frames, cfg=2), decode]}


def random_text_encoder(setup, device, dtype):
    """A stand-in for the text encoder: prompts -> random features of the real shapes, tokens
    (n, 77, width) and pooled (n, embed_dim). The real one runs once per video (~0.05 TFLOPs for
    ViT-H/14) and is left out, as in the paper."""
    width, pooled_dim = setup["unet"]["cross_attention_dim"], setup["motion"].pooled_dim
    return lambda prompts: (torch.randn(len(prompts), setup["text_len"], width, device=device, dtype=dtype),
                            torch.randn(len(prompts), pooled_dim, device=device, dtype=dtype))


def sd_frame_space(vae, frames_at_once):
    """ae.FrameSpace around an SD VAE with random weights, in place of a download."""
    frame_space = ae.FrameSpace(frames_at_once=frames_at_once)
    frame_space.vae = vae
    return frame_space


@torch.no_grad()
def sample_video(system, nets, text_encoder, setup, eager=False):
    """One video by `system`, through the real samplers (content.Diffusion's DDIM, guidance on
    the batched pair): (1, L, 3, 8H, 8W) pixels. As sample.py runs on a GPU, each DDIM step a CUDA graph
    and the SD VAE decoding `frames_at_once`; eager: each step launched from Python, a frame at a time."""
    diffusion = Diffusion(prediction_type="v_prediction")
    frame_space = sd_frame_space(nets["vae"], 1 if eager else setup["frames_at_once"])
    if system == "CMD":  # sample.py's Algorithm 1 (its one extra SD decode, of the content frame, included)
        models = Models(text_encoder, nets["unet"], diffusion, nets["dit"], diffusion, nets["ae"], frame_space,
                        setup["cfg_scale"], setup["cfg_scale"], setup["content_steps"], setup["motion_steps"])
        return generate(models, ["a prompt"], progress=False, cuda_graphs=not eager)[0]
    ddim = dict(steps=setup["content_steps"], cfg_scale=setup["cfg_scale"], progress=False, cuda_graph=not eager)
    L, C, H, W = setup["ae"].frames, setup["ae"].channels, *setup["sample_latent"]
    tokens, null_tokens = text_encoder(["a prompt"])[0], text_encoder([""])[0]
    if system == "ModelScope":  # all frames denoised jointly
        video = diffusion.ddim_sample(modelscope_model_fn(nets["unet3d"]), (1, C, L, H, W), tokens, null_tokens, **ddim)
        frames = rearrange(video, "b c l h w -> b l c h w")
    else:  # frame-wise SD: the frames as a batch of independent images with the same prompt
        frames = diffusion.ddim_sample(unet_model_fn(nets["unet"]), (L, C, H, W), tokens.expand(L, -1, -1),
                                       null_tokens.expand(L, -1, -1), **ddim)[None]
    return frame_space.decode(frames)


# ----------------------------------------------------------------------------- benchmark: training (Table 8)
# One training step on 16-frame 512x512 videos, batch 1.

def training_case(name, setup, device):
    """(model, loss()) of one training step of `name`: each stage's own training_step (ae.py, content.py,
    motion.py), the loss it trains with on random inputs of the right shapes; ModelScope's alike."""
    a, m = configs_at(setup, setup["train_latent"])
    text = (setup["text_len"], setup["unet"]["cross_attention_dim"])
    if name == "CMD autoencoder":
        return ae.training_step(a, device)
    if name == "CMD motion diffusion":
        return motion.training_step(m, device, setup["text_len"])
    model = build(setup, [TRAINING[name][0]], setup["train_latent"], device)[TRAINING[name][0]]
    model.train().requires_grad_(True)
    if name == "CMD content-frame diffusion":
        return model, content.training_step(model, (a.channels, a.height, a.width), text, device)
    with torch.device(device):
        video, tokens = torch.randn(1, a.channels, a.frames, a.height, a.width), torch.randn(1, *text)
    diffusion = Diffusion(prediction_type="v_prediction")
    return model, lambda: diffusion.loss(modelscope_model_fn(model), video, tokens)


def training_flops(setup):
    """{name: (FLOPs of a training step = forward + backward, forward FLOPs, their attention share)},
    counted on `meta`."""
    costs = {}
    for name in TRAINING:
        model, loss = training_case(name, setup, "meta")
        step, _ = count_flops(lambda: loss().backward())
        costs[name] = (step, *count_flops(loss))
    return costs


# ----------------------------------------------------------------------------- benchmark: time and memory
# Wall clock and peak memory, on a GPU.

# ----------------------------------------------------------------------------- profile: where the time goes
# Algorithm 1 part by part, at a preset's sizes with random weights, on any device: the seconds and
# FLOPs (FlopCounterMode, as above) of one call of each part, and the share of the GPU's peak it uses.

PEAK_TFLOPS = {"NVIDIA H200": 989, "NVIDIA H100 80GB HBM3": 989, "NVIDIA A100-SXM4-80GB": 312,
               "NVIDIA A100-SXM4-40GB": 312}  # dense bf16, the vendors' datasheets


def preset_models(preset, device, resolution=None):
    """sample.Models of a preset, random weights at its sizes (the paper's: SD 2.1, ViT-H-14, DiT-XL/2)."""
    a = ae.preset_config(preset, resolution)
    c = content.PRESETS[preset]
    with torch.device(device):
        if c["text"] in ("words", "classes"):
            text_encoder = content.BagOfWords({"words": WORDS} if c["text"] == "words"
                                              else {"classes": [f"class {k}" for k in range(101)]})
        else:
            text_encoder = content.TextEncoder(content.text_config(c["text"]))
        unet = (UNet2DConditionModel(**SD21_UNET_CONFIG) if c["sd"] else
                content.scratch_unet(c["unet"], text_encoder.width, (a.height, a.width), a.channels))
        dit = MotionDiT(motion.config_for(preset, None, a, (text_encoder.width, text_encoder.embed_dim)))
        frame_space = sd_frame_space(AutoencoderKL(**SD21_VAE_CONFIG), ae.FrameSpace().frames_at_once) if a.sd \
            else ae.FrameSpace()
        autoencoder = ae.Autoencoder(a)
    nets = [net.eval().requires_grad_(False) for net in (text_encoder, unet, dit, autoencoder)]
    diffusion = Diffusion(prediction_type="v_prediction")
    return Models(nets[0], nets[1], diffusion, nets[2], diffusion, nets[3], frame_space, c["cfg_scale"],
                  dit.config.cfg_scale, c["sample_steps"], dit.config.sample_steps)


def timed(fn, device, runs):
    """Median seconds of fn() after a warm-up, the GPU synchronised around each call."""
    fn()
    seconds = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


@torch.no_grad()
def profile(preset, device, resolution, runs, steps):
    """Print, and return as the JSON line, each part of Algorithm 1: calls per video, seconds and
    TFLOPs a call, TFLOP/s, the share of the GPU's dense bf16 peak, and seconds per video."""
    models = preset_models(preset, device, resolution)
    models.content_steps, models.motion_steps = steps["content_steps"], steps["motion_steps"]
    te, a, L = models.text_encoder, models.ae.config, models.ae.config.frames
    prompt = te.config["classes"][0] if "classes" in te.config else "a red circle moving left on a dark background"
    with torch.device(device):
        x, t = torch.randn(2, a.channels, a.height, a.width), torch.full((2,), 500)
        z = torch.randn(2, L, (a.height + a.width) // a.patch, a.motion_dim)
        frames = torch.randn(1, L, a.channels, a.height, a.width)
    tokens, pooled = (torch.cat([u, v]) for u, v in zip(te([prompt]), te([""])))  # the CFG pair
    parts = {"text encoder, a prompt and the null one": (1, lambda: (te([prompt]), te([""]))),
             "content UNet, a DDIM step (CFG batch 2)": (models.content_steps,
                                                          lambda: unet_model_fn(models.unet)(x, t, tokens)),
             "motion DiT, a DDIM step (CFG batch 2)": (models.motion_steps,
                                                       lambda: dit_model_fn(models.dit)(z, t, (x, tokens, pooled))),
             "AE decoder": (1, lambda: models.ae.decode(x[:1], z[:1])),
             f"{'SD VAE decoder' if a.sd else 'frame space (pixels)'}, {L} frames + the content frame":
                 (1, lambda: (models.frame_space.decode(frames), models.frame_space.decode(frames[:, :1]))),
             "Algorithm 1, the whole video (generate)": (1, lambda: generate(models, [prompt], progress=False))}
    peak = PEAK_TFLOPS.get(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result, rows = {"preset": preset, "device": str(device), "torch": torch.__version__, **steps}, []
    with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda", cache_enabled=False):
        for name, (calls, fn) in parts.items():
            flops = count_flops(lambda: generate(models, [prompt], progress=False, cuda_graphs=False)
                                if name.startswith("Algorithm") else fn())[0]  # graph replays are not seen
            seconds = timed(fn, device, runs)
            share = f"{flops / seconds / 1e12 / peak:.1%}" if peak else "-"
            rows.append((name, calls, f"{seconds * 1e3:.2f}", f"{flops / 1e12:.4f}", f"{flops / seconds / 1e12:.1f}",
                         share, f"{calls * seconds:.3f}"))
            result[name] = {"calls": calls, "seconds": seconds, "tflops": flops / 1e12}
    print(f"## Algorithm 1 at the {preset} preset, {a.video_size[0]}x{a.video_size[1]}, on {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, {dtype}, "
          f"median of {runs} after a warm-up; the whole video as sample.py runs it\n")
    print(markdown(["part", "calls a video", "ms a call", "TFLOPs a call", "TFLOP/s", "of the dense bf16 peak",
                    "seconds a video"], rows))
    print(json.dumps(result))
    return result


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


def sampling_on_gpu(setup, device, runs, compile_models=False, eager=False, systems=tuple(SYSTEMS)):
    """{system: (seconds, peak GB)} of sampling one video, bf16 weights, plus "SD decode" alone; as
    sample.py runs (or eager: sample_video). Every system gets the same treatment. Autocast turns the
    few fp32 tensors (the DDIM state, timestep features) into bf16 on the fly."""
    text_encoder = random_text_encoder(setup, device, torch.bfloat16)
    results = {}
    for system in systems:
        nets = build(setup, SYSTEMS[system][0], setup["sample_latent"], device, torch.bfloat16)
        if compile_models:  # the denoisers: the DDIM loops are where the time goes
            nets.update({k: torch.compile(v) for k, v in nets.items() if k in ("unet", "dit", "unet3d")})
        with torch.autocast(device.type, dtype=torch.bfloat16):
            results[system] = measure(lambda: sample_video(system, nets, text_encoder, setup, eager), device, runs)
            if system == "CMD":
                a = setup["ae"]
                latents = torch.randn(1, a.frames, a.channels, *setup["sample_latent"], device=device)
                frame_space = sd_frame_space(nets["vae"], 1 if eager else setup["frames_at_once"])
                results["SD decode"] = measure(lambda: frame_space.decode(latents), device, runs)
        del nets
        torch.cuda.empty_cache()
    return results


def training_on_gpu(setup, device, runs, compile_models=False):
    """{name: (seconds per step, peak GB) or None if out of memory}: data.train's step, bf16 autocast
    on fp32 weights, backward, fused AdamW (its EMA update left out, as in the paper's baselines)."""
    results = {}
    for name in TRAINING:
        model, loss = training_case(name, setup, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0, fused=True)
        loss = torch.compile(loss) if compile_models else loss

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
    print(f"## Sampling one {L}-frame {8 * H}x{8 * W} video: {setup['content_steps']} + {setup['motion_steps']} DDIM "
          "steps with CFG, batch 1 (ModelScope and frame-wise SD: the first number)\n")
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


def print_gpu(setup, device, runs, compile_models, eager=False):
    """Time and peak memory of sampling and of training steps; returns their numbers."""
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    how = "eager: each DDIM step launched from Python, the SD VAE a frame at a time" if eager else \
        f"as sample.py: each DDIM step a CUDA graph, the SD VAE {setup['frames_at_once']} frames at once"
    print(f"## Time and memory on {result['device']} (torch {torch.__version__}): bf16, {how}, median of {runs} runs "
          f"after a warm-up{', torch.compile' if compile_models else ''}; peak = torch.cuda.max_memory_allocated, "
          "weights included\n")
    timed = sampling_on_gpu(setup, device, runs, compile_models, eager)
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
    for name, measured in training_on_gpu(setup, device, runs, compile_models).items():
        paper = PAPER_TRAINING[name]
        if measured is None:
            rows.append((name, "out of memory", "-", paper[1], paper[2]))
            continue
        seconds, peak = measured
        rows.append((name, f"{seconds:.3f}", f"{peak:.1f}", paper[1], paper[2]))
        result.update({f"{TRAINING[name][1]}_seconds": seconds, f"{TRAINING[name][1]}_peak_gb": peak})
    print("\n" + markdown(["training step", "seconds", "peak GB", "paper s (A100)", "paper GB"], rows))
    return result


def bench(device, setup=PAPER_SETUP, runs=3, compile_models=False, eager=False):
    """Print the paper's two efficiency tables next to ours and return ours as a dict, also
    printed as the last line (JSON). FLOPs always (on `meta`); seconds and memory on a GPU."""
    start = time.perf_counter()
    sampling, training = sampling_flops(setup), training_flops(setup)
    flops_seconds = time.perf_counter() - start
    result = print_flops(sampling, training, setup)
    print(f"FLOPs counted in {flops_seconds:.1f} s.\n")
    result["flops_seconds"] = flops_seconds
    if device.type == "cuda":
        result.update(print_gpu(setup, device, runs, compile_models, eager))
    else:
        print("No GPU: seconds and memory need one (python tools/bench.py --device cuda on a CUDA machine).")
    result = {k: significant(v) if isinstance(v, float) else v for k, v in result.items()}
    print(json.dumps(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="seconds and memory are measured on cuda only (--profile: any device)")
    parser.add_argument("--compile", action="store_true", help="time the denoisers and training under torch.compile")
    parser.add_argument("--eager", action="store_true", help="time sampling without CUDA graphs, a frame at a time")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per number (their median)")
    parser.add_argument("--steps", type=int, help="DDIM steps of both stages (default 50, the paper's)")
    parser.add_argument("--content-steps", type=int, help="DDIM steps of the content frame (and of the baselines)")
    parser.add_argument("--motion-steps", type=int, help="DDIM steps of the motion latent")
    parser.add_argument("--profile", action="store_true", help="where Algorithm 1's time goes, part by part")
    parser.add_argument("--preset", default="paper", choices=ae.PRESETS, help="with --profile: the sizes")
    parser.add_argument("--resolution", type=parse_resolution, help="with --profile: HEIGHTxWIDTH of the video")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but PyTorch sees no CUDA GPU")
    steps = dict(content_steps=args.content_steps or args.steps or 50,
                 motion_steps=args.motion_steps or args.steps or 50)
    if args.profile:
        return profile(args.preset, device, args.resolution, args.runs, steps)
    return bench(device, {**PAPER_SETUP, **steps}, runs=args.runs, compile_models=args.compile, eager=args.eager)


if __name__ == "__main__":
    main()

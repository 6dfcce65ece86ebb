"""The paper path on one GPU, end to end: each stage trains a few steps, then one video is sampled;
and, with --preset ucf, what the release's UCF-101 experiment costs on this GPU.

It runs the stage scripts' own main() with the README's paper-preset commands, on what a user
would have, made up here with random weights so that nothing is downloaded:
  * a Stable Diffusion 2.1-base folder (diffusers layout: unet/, vae/, scheduler/),
  * an open_clip ViT-H-14 text checkpoint,
  * a CSV of 16-frame-plus mp4 clips at the training resolution (moving colour blobs),
then prints each stage's time per step and peak GPU memory (bf16 autocast, gradient
checkpointing, batch 1, under `torch.cuda.set_per_process_memory_fraction` set to an 80 GB
A100's share of this GPU), and the time of sampling one video with 50 + 50 DDIM steps and
classifier-free guidance. The last line is JSON.

    python tools/paper_check.py --device cuda                 # 16 x 512 x 1024, DiT-XL/2
    python tools/paper_check.py --toy                         # the same path at toy size, on the CPU
    python tools/paper_check.py --preset ucf --device cuda    # the ucf stages' largest batch, s/step, days

--toy uses tiny widths (the same classes and block types) and 64x128 videos: what the tests run.
With --preset ucf, each ucf stage's training step (its own training_step: the AE with the release's
L1 + LPIPS, AdamW, bf16 autocast) is measured at two batches; their peak memory, a straight line in
the batch, gives the largest power-of-two batch under the memory cap, which is then timed: seconds
per step of the release's global batch of 256 (accumulating), and the GPU-days of the release's
epochs (AE 2,000, content and motion 1,400, of trainlist01's 9,537 videos).
"""
import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import lpips
import numpy as np
import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stage files live one folder up
import ae  # noqa: E402
import content  # noqa: E402
import motion  # noqa: E402
import sample  # noqa: E402
from data import write_video  # noqa: E402
from tools.bench import SD21_VAE_CONFIG  # noqa: E402

# Stable Diffusion 2.1-base's scheduler/scheduler_config.json (a PNDM scheduler there; we read its
# noise schedule only): epsilon prediction, scaled-linear betas.
SD21_BASE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type="epsilon", steps_offset=1, set_alpha_to_one=False, clip_sample=False)
# SD 2.1-base's UNet is SD 2.1's at sample_size 64 (512 px); the rest of the config is the same.
SD21_BASE_UNET = {**content.SD21_UNET_CONFIG, "sample_size": 64}

# The same classes and block types at toy widths: SD's UNet (3 cross-attention blocks, then one
# without), an 8x VAE (4 blocks), and an open_clip CLIP config whose text tower is 32 wide.
TOY_TEXT = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
TOY_UNET = {**SD21_BASE_UNET, "sample_size": 8, "block_out_channels": (32, 32, 64, 64), "layers_per_block": 1,
            "attention_head_dim": (2, 2, 4, 4), "norm_num_groups": 8, "cross_attention_dim": 32}
TOY_VAE = {**SD21_VAE_CONFIG, "block_out_channels": (8, 8, 16, 16), "layers_per_block": 1, "norm_num_groups": 4,
           "sample_size": 64}


def write_sd_folder(path, unet_config=SD21_BASE_UNET, vae_config=SD21_VAE_CONFIG):
    """A Stable Diffusion folder in diffusers' layout, with random weights."""
    torch.manual_seed(0)
    UNet2DConditionModel(**unet_config).save_pretrained(Path(path) / "unet")
    AutoencoderKL(**vae_config).save_pretrained(Path(path) / "vae")
    DDIMScheduler(**SD21_BASE_SCHEDULE).save_pretrained(Path(path) / "scheduler")
    return Path(path)


def write_text_checkpoint(path, model_config):
    """An open_clip checkpoint of a model config's text tower, its keys at the top level as in
    CLIP checkpoints (ViT-H-14's), with random weights."""
    torch.manual_seed(0)
    torch.save(content.TextEncoder(model_config).text.state_dict(), path)
    return Path(path)


def write_clips(folder, size, count=4, frames=20, seed=0):
    """`count` mp4 clips of `frames` frames, (height, width) pixels: a blob of colour drifting
    across a gradient. Returns their paths."""
    rng = np.random.default_rng(seed)
    height, width = size
    ys, xs = np.mgrid[:height, :width] / max(height, width)
    paths = []
    for k in range(count):
        colour, start, step = rng.uniform(0, 255, 3), rng.uniform(0.2, 0.5, 2), rng.uniform(-0.01, 0.01, 2)
        video = np.empty((frames, height, width, 3))
        for i in range(frames):
            cy, cx = start + i * step
            blob = np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 0.01)[..., None]
            video[i] = (1 - blob) * 255 * ys[..., None] + blob * colour
        paths.append(Path(folder) / f"clip{k}.mp4")
        write_video(paths[-1], video.round().astype(np.uint8))
    return paths


def write_csv(path, rows):
    """A --data CSV of (video path, caption) rows; captions may hold commas (csv quotes them)."""
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([("path", "caption"), *rows])
    return Path(path)


def peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


# The release's UCF-101 training (train_*.py): epochs of trainlist01's videos, at a global batch of 256.
UCF_EPOCHS, UCF_VIDEOS, UCF_BATCH = {"ae": 2000, "content": 1400, "motion": 1400}, 9537, 256
A100_OVER_THIS = {"NVIDIA H200": 312 / 989, "NVIDIA H100 80GB HBM3": 312 / 989}  # dense bf16 peaks, TFLOP/s


def ucf_training_steps(device, toy):
    """{stage: batch -> (model, loss())}: each ucf stage's own training_step, at 64x64 (toy: 16x16, LPIPS's
    least, the tiny UNet and DiT); the AE's loss with LPIPS on a random VGG16 (its cost matters here)."""
    frames = ae.preset_config("ucf", (16, 16) if toy else None)
    perceptual = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).to(device).eval().requires_grad_(False)
    dit = motion.config_for("ucf", "tiny" if toy else None, frames, (101, 101))  # UCF-101's 101 classes

    def content_step(batch):
        shape = content.PRESETS["tiny" if toy else "ucf"]["unet"]
        unet = content.scratch_unet(shape, 101, (frames.height, frames.width)).to(device)
        return unet, content.training_step(unet, (3, frames.height, frames.width), (1, 101), device, batch)
    return {"ae": lambda batch: ae.training_step(frames, device, batch, ae.release_pixel_loss(perceptual)),
            "content": content_step,
            "motion": lambda batch: motion.training_step(dit, device, text_len=1, batch_size=batch)}


def time_step(make, batch, device, runs=3):
    """(seconds, peak GB) of one optimizer step at this batch: bf16 autocast, backward, AdamW (fused on
    CUDA); the median of `runs` after a warm-up."""
    model, loss = make(batch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    seconds = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(runs + 1):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            value = loss()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - start)
    return float(np.median(seconds[1:])), peak_gb(device)


def ucf_check(device, memory_gb, toy):
    """Per ucf stage: the largest power-of-two batch under memory_gb (peak memory is a straight line in the
    batch: measured at 4 and 8), its seconds per step of 256, and the release's epochs in GPU-days."""
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for stage, make in ucf_training_steps(device, toy).items():
        if device.type == "cuda":
            (_, small), (_, large) = time_step(make, 4, device, runs=1), time_step(make, 8, device, runs=1)
            per_video = (large - small) / 4
            batch = max(b for b in (2 ** k for k in range(9)) if small + per_video * (b - 4) < 0.9 * memory_gb)
        else:
            batch = 1
        while True:
            try:
                seconds, peak = time_step(make, batch, device, runs=3 if device.type == "cuda" else 1)
                break
            except torch.cuda.OutOfMemoryError:  # the straight line was optimistic: half the batch
                batch //= 2
                torch.cuda.empty_cache()
        per_step = seconds * UCF_BATCH / batch
        days = UCF_EPOCHS[stage] * UCF_VIDEOS / UCF_BATCH * per_step / 86400
        result[stage] = {"batch": batch, "grad_accum": UCF_BATCH // batch, "seconds_per_micro_batch": seconds,
                         "peak_gb": peak, "seconds_per_step_of_256": per_step, "days_here": days,
                         "a100_days_estimate": days / A100_OVER_THIS[result["device"]]
                         if result["device"] in A100_OVER_THIS else None}
        print(f"{stage}: batch {batch} x {UCF_BATCH // batch} accumulated, {per_step:.2f} s a step of 256, "
              f"peak {peak} GB; {UCF_EPOCHS[stage]} epochs: {days:.1f} days here")
    print(json.dumps(result))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--toy", action="store_true", help="tiny widths and 64x128 videos (a CPU dry run)")
    parser.add_argument("--steps", type=int, default=4, help="training steps per stage (the first one warms up)")
    parser.add_argument("--memory-gb", type=float, default=80, help="cap GPU memory at this much (an A100's 80)")
    parser.add_argument("--work", default=None, help="folder for the random checkpoints and clips (default: a temp)")
    parser.add_argument("--preset", default="paper", choices=("paper", "ucf"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gb * 1e9 / total), device)
    if args.preset == "ucf":
        return ucf_check(device, args.memory_gb, args.toy)
    work = Path(args.work or tempfile.mkdtemp(prefix="cmd-paper-check-"))
    resolution = (64, 128) if args.toy else (512, 1024)
    start = time.perf_counter()
    sd = write_sd_folder(work / "sd", *((TOY_UNET, TOY_VAE) if args.toy else (SD21_BASE_UNET, SD21_VAE_CONFIG)))
    text = ["--text-weights", str(write_text_checkpoint(work / "text.pt", TOY_TEXT if args.toy else
                                                        open_clip.get_model_config("ViT-H-14")))]
    if args.toy:
        (work / "text.json").write_text(json.dumps(TOY_TEXT))
        text += ["--text", str(work / "text.json")]
    clips = write_clips(work, resolution)
    listing = write_csv(work / "videos.csv", [(path.name, f"a colour blob drifting, clip {k}")
                                              for k, path in enumerate(clips)])
    print(f"random SD 2.1-base, text tower and {len(clips)} clips in {work} ({time.perf_counter() - start:.0f} s)")
    run = work / "run"
    common = ["--preset", "paper", "--data", str(listing), "--out", str(run), "--steps", str(args.steps),
              "--batch-size", "1", "--grad-accum", "1", "--grad-checkpointing", "--val-fraction", "0.25"]
    stages = {"ae": (ae, ["--sd", str(sd), "--resolution", "x".join(map(str, resolution))]),
              "content": (content, ["--sd", str(sd), *text]),
              "motion": (motion, [*text, *(["--size", "tiny"] if args.toy else [])])}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "resolution": list(resolution)}
    for name, (stage, flags) in stages.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        stage.main([*common, *flags])
        lines = [json.loads(line) for line in open(run / "metrics.jsonl") if f'"stage": "{name}"' in line]
        seconds = [line["step_seconds"] for line in lines if "step_seconds" in line]
        result[f"{name}_seconds_per_step"] = float(np.median(seconds[1:] or seconds))  # the first one warms up
        result[f"{name}_peak_gb"] = peak_gb(device)
    models = sample.load_models(run, device)
    for warm_up in (True, False):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with sample.autocast_for(device, None):
            video, _ = sample.generate(models, ["a colour blob drifting"], 50, progress=False,
                                       generator=torch.Generator(device).manual_seed(0))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    result.update(sample_seconds=time.perf_counter() - start, sample_peak_gb=peak_gb(device),
                  sample_shape=list(video.shape))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()

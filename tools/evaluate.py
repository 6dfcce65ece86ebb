"""Evaluate text-to-video like the paper: FVD and CLIPSIM, and the shapes world's detector.

FVD (Unterthiner et al. 2018, "Towards accurate generative models of video"): the Fréchet
distance between Gaussians fitted to Kinetics-400 I3D features of real and generated videos.
Two conventions are in use (docs/evaluating.md); both run StyleGAN-V's TorchScript port of the
TF-Hub I3D, i3d_torchscript.pt, a local file (--i3d), and take its 400 pre-softmax features:
  * --fvd stylegan-v (the default; StyleGAN-V's fvd2048_16f, which Latte and most later papers
    quote): the first 16 frames of the whole clip, uint8, called with rescale=True, resize=True
    (the network makes its own 224 x 224 input), statistics with the biased covariance,
  * --fvd pvdm (PVDM's and the CMD release's, as common_metrics_on_video_quality computes it):
    shorter side resized to 224, centre crop, [-1, 1], rescale=False, resize=False, the unbiased
    covariance,
  * 2,048 videos per set (--num-videos), fixed seeds (--seed),
  * the real set: --data's held-out split (data.make_dataset(split="val"), as training holds
    it out; --split train for the release's and TATS' UCF-101 real set, --split all for a listing
    held out already, or UCF-101's train+test as StyleGAN-V's), at the generated videos' size, so that both sets take the same path to the I3D,
  * the Fréchet distance of float64 statistics (frechet_distance below).
CLIPSIM (Wu et al. 2021, GODIVA): the cosine similarity between each frame's CLIP image
embedding and its prompt's text embedding, averaged over frames and videos; OpenCLIP ViT-B-32
from a local checkpoint (--clip-weights); reported as the raw cosine (papers often print x100).
--shapes N: the shapes world's evaluation (tools/shapes.py): does a generated video show the
colour, shape and motion its caption asks for? With --i3d, also the FVD of those videos.

    python tools/evaluate.py --shapes 200       # the run's DDIM steps and guidance
    python tools/evaluate.py --shapes 200 --i3d i3d_torchscript.pt
    python tools/evaluate.py --run runs/ucf --data UCF-101/ --i3d i3d_torchscript.pt \\
        --save-features ucf101.npz              # class-conditional: the 101 classes, uniformly
    python tools/evaluate.py --run runs/paper --data webvid/results_10M_val.csv --split all \\
        --i3d i3d_torchscript.pt
    python tools/evaluate.py --run runs/paper --prompts msrvtt-test-captions.txt --num-videos 2990 \\
        --clip-weights open_clip_pytorch_model.bin --clip-model ViT-B-32-quickgelu
    python tools/evaluate.py --videos generated/ --real-features ucf101.npz --i3d i3d_torchscript.pt

The last line of stdout is a JSON line: {"fvd": ..., "clipsim": ..., "n": ..., "protocol": {...}}.
DDIM steps and guidance: the run's (the paper preset's 50 + 50, as the paper samples, App. B.4),
or --steps, --content-steps, --motion-steps, --cfg-content, --cfg-motion.
"""
import argparse
import hashlib
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from tqdm import tqdm

# The stage files (data.py, sample.py) live one folder up: make them importable from anywhere.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sample  # noqa: E402
from tools.shapes import evaluate_motion_transfer, evaluate_shapes  # noqa: E402

FRAMES = 16      # frames per video the I3D sees
I3D_SIZE = 224   # side of the I3D's input
# sha256 of StyleGAN-V's i3d_torchscript.pt as other FVD code records it (not checked here: no network).
I3D_SHA256 = "bec6519f66ea534e953026b4ae2c65553c17bf105611c746d904657e5860a5e2"


class InputError(Exception):
    """A file, folder or video the user gave that cannot be used; main prints it as one line."""


# ----------------------------------------------------------------------------- the Fréchet distance

def statistics(features, convention="stylegan-v"):
    """(mean, covariance) of features (N, d) in float64. StyleGAN-V's FeatureStats keeps the biased
    covariance, sum of x x^T / N - mean mean^T; PVDM's code (and the TF original) the unbiased one."""
    x = np.asarray(features, np.float64)
    mean = x.mean(0)
    if convention == "stylegan-v":
        return mean, x.T @ x / len(x) - np.outer(mean, mean)
    return mean, np.cov(x, rowvar=False)


def frechet_distance(features_a, features_b, convention="stylegan-v"):
    """Fréchet distance between Gaussians fitted to two feature sets (N, d) (statistics above):

        d^2 = |mu_a - mu_b|^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^{1/2})

    (Dowson & Landau 1982; FID, Heusel et al. 2017; on I3D features FVD, Unterthiner et al. 2018).
    S_a S_b has the eigenvalues of the symmetric S_a^{1/2} S_b S_a^{1/2}, so the trace of its
    square root is the sum of their square roots: two symmetric eigendecompositions, stable when
    N < d leaves the covariances singular (no general sqrtm, no complex parts to discard)."""
    (mean_a, cov_a), (mean_b, cov_b) = statistics(features_a, convention), statistics(features_b, convention)
    root_a = symmetric_sqrt(cov_a)
    eigenvalues = np.linalg.eigvalsh(root_a @ cov_b @ root_a).clip(min=0)  # >= 0 up to rounding
    distance = ((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.sqrt(eigenvalues).sum()
    return float(max(distance, 0.0))  # rounding leaves ~ -1e-12 for identical statistics


def symmetric_sqrt(matrix):
    """S^{1/2} of a symmetric positive semi-definite matrix, through S = V diag(w) V^T."""
    w, v = np.linalg.eigh(matrix)
    return (v * np.sqrt(w.clip(min=0))) @ v.T


# ----------------------------------------------------------------------------- FVD features

def resize_and_crop(frames, size, mode):
    """float (L, 3, H, W) -> (L, 3, size, size): shorter side resized to size, centre crop; sizes
    and offsets rounded as torchvision's Resize and CenterCrop round them."""
    h, w = frames.shape[-2:]
    resized = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    # FVD code resizes without antialiasing (as TF's resize_bilinear); CLIP's PIL resize antialiases.
    frames = F.interpolate(frames, size=resized, mode=mode, antialias=mode == "bicubic", align_corners=False)
    top, left = round((resized[0] - size) / 2), round((resized[1] - size) / 2)
    return frames[..., top:top + size, left:left + size]


def i3d_input(video, convention="stylegan-v"):
    """uint8 (L, H, W, 3) -> the I3D's input (3, 16, H', W'), its first 16 frames: uint8 as they are
    (stylegan-v), or float in [-1, 1], shorter side resized to 224 and centre-cropped (pvdm)."""
    frames = torch.from_numpy(np.ascontiguousarray(video[:FRAMES])).permute(3, 0, 1, 2)  # (3, T, H, W)
    if convention == "stylegan-v":
        return frames
    frames = resize_and_crop(frames.transpose(0, 1).float(), I3D_SIZE, "bilinear")
    return (frames / 127.5 - 1).transpose(0, 1)


@torch.no_grad()
def i3d_features(detector, videos, device, convention="stylegan-v"):
    """uint8 videos [(L, H, W, 3)] -> I3D features (B, 400) float64: the logits, before the softmax.
    StyleGAN-V lets the network rescale [0, 255] to [-1, 1] and resize to 224 x 224 (rescale=True,
    resize=True); PVDM's convention hands it frames made so already (i3d_input)."""
    batch = torch.stack([i3d_input(v, convention) for v in videos]).to(device)
    ours = convention == "stylegan-v"
    return detector(batch, rescale=ours, resize=ours, return_features=True).double().cpu().numpy()


def load_i3d(path, device):
    """StyleGAN-V's TorchScript I3D, i3d_torchscript.pt, checked to take its call signature."""
    if not Path(path).is_file():
        raise InputError(f"--i3d {path}: no such file; download i3d_torchscript.pt (see docs/evaluating.md)")
    try:
        detector = torch.jit.load(str(path), map_location=device).eval()
        arguments = {a.name for a in detector.forward.schema.arguments}
    except (RuntimeError, AttributeError) as e:
        raise InputError(f"--i3d {path} is not a TorchScript network ({str(e).split('.')[0]}): "
                         "want StyleGAN-V's i3d_torchscript.pt") from e
    if not {"rescale", "resize", "return_features"} <= arguments:
        raise InputError(f"--i3d {path} takes ({', '.join(sorted(arguments - {'self'}))}), not the "
                         "(videos, rescale, resize, return_features) of StyleGAN-V's i3d_torchscript.pt")
    return detector


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- CLIPSIM

@torch.no_grad()
def clip_similarities(clip, videos, prompts, device):
    """uint8 videos [(L, H, W, 3)] and their prompts -> (B,) each video's mean over frames of
    cos(CLIP image embedding of the frame, CLIP text embedding of the prompt)."""
    model, tokenizer = clip
    text = F.normalize(model.encode_text(tokenizer(list(prompts)).to(device)).float(), dim=-1)  # (B, E)
    means = []
    for video, text_embedding in zip(videos, text):
        images = F.normalize(model.encode_image(clip_input(video, model.visual.preprocess_cfg).to(device)).float(),
                             dim=-1)  # (L, E)
        means.append((images @ text_embedding).mean().item())
    return np.array(means)


def clip_input(video, preprocess):
    """uint8 (L, H, W, 3) -> (L, 3, S, S) as open_clip's image transform makes it: shorter side
    resized to S (bicubic), centre crop, normalised with the model's mean and std."""
    side = preprocess["size"] if isinstance(preprocess["size"], int) else preprocess["size"][0]
    frames = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float()
    frames = resize_and_crop(frames, side, "bicubic").clamp(0, 255) / 255
    mean, std = (torch.tensor(preprocess[k]).view(3, 1, 1) for k in ("mean", "std"))
    return (frames - mean) / std


def load_clip(model_name, weights, device):
    """An OpenCLIP model and its tokenizer from a local checkpoint file (a state dict, as open_clip
    releases them; OpenAI's weights need the '-quickgelu' model name)."""
    if open_clip.get_model_config(model_name) is None:
        raise InputError(f"--clip-model {model_name}: open_clip knows no such model (e.g. ViT-B-32)")
    if not Path(weights).is_file():
        raise InputError(f"--clip-weights {weights}: no such file")
    try:
        model = open_clip.create_model(model_name, pretrained=str(weights), device=device)
    except (RuntimeError, ValueError, KeyError, EOFError, pickle.UnpicklingError) as e:
        raise InputError(f"--clip-weights {weights} is not an open_clip {model_name} checkpoint "
                         f"({str(e).splitlines()[0]})") from e
    return model.eval(), open_clip.get_tokenizer(model_name)


# ----------------------------------------------------------------------------- the two sets of videos

def score(batches, n, detector, clip, device, desc, convention="stylegan-v"):
    """Run the networks over batches of (uint8 videos [(L, H, W, 3)], their prompts or None) ->
    (I3D features (n, d) or None, CLIPSIM of each video (n,) or None, the prompts seen)."""
    features, similarities, prompts_seen = [], [], []
    with tqdm(total=n, desc=desc, unit="video") as bar:
        for videos, prompts in batches:
            if detector is not None:
                features.append(i3d_features(detector, videos, device, convention))
            if clip is not None:
                similarities.append(clip_similarities(clip, videos, prompts, device))
            prompts_seen += prompts or []
            bar.update(len(videos))
    return (np.concatenate(features) if features else None,
            np.concatenate(similarities) if similarities else None, prompts_seen)


def real_set(args, size):
    """The real videos: a split of --data as data.make_dataset reads it (the held-out slice is chosen
    by --val-fraction and --data-seed, as in training), at the generated videos' size ->
    (dataset, the indices of --num-videos of its videos, drawn with --seed)."""
    spec, split, n = args.data, args.split, args.num_videos
    try:
        dataset = data.make_dataset(spec, frames=FRAMES, size=size, split=split, seed=args.data_seed,
                                    val_fraction=args.val_fraction)
    except (OSError, ValueError) as e:
        raise InputError(f"--data {spec}: {e}") from e
    if len(dataset) < n:
        raise InputError(f"--data {spec}: its {split!r} split holds {len(dataset)} videos, fewer than "
                         f"--num-videos {n}")
    return dataset, np.sort(np.random.default_rng(args.seed).choice(len(dataset), n, replace=False))


def real_batches(dataset, indices, batch_size):
    """Batches of (uint8 videos, captions); clip starts come from torch's RNG, seeded by the caller."""
    for i in range(0, len(indices), batch_size):
        items = [dataset[int(k)] for k in indices[i:i + batch_size]]
        yield [data.video_to_uint8(video) for video, _ in items], [caption for _, caption in items]


def video_files(folder, n):
    """The first n video files of a folder, in name order."""
    if not Path(folder).is_dir():
        raise InputError(f"--videos {folder}: no such folder")
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in data.VIDEO_SUFFIXES)
    if len(paths) < n:
        raise InputError(f"--videos {folder} holds {len(paths)} videos, fewer than --num-videos {n}")
    return paths[:n]


def file_batches(paths, prompts, batch_size):
    """Batches of (uint8 videos read from files, the prompts of video i: prompts[i % len(prompts)])."""
    for i in range(0, len(paths), batch_size):
        chunk = range(i, min(i + batch_size, len(paths)))
        videos = [check_length(data.read_video(paths[k]), paths[k]) for k in chunk]
        yield videos, [prompts[k % len(prompts)] for k in chunk] if prompts else None


def check_length(video, name):
    if len(video) < FRAMES:
        raise InputError(f"{name} has {len(video)} frames, fewer than the {FRAMES} that FVD takes")
    return video


def sampling_of(args, models):
    """generate()'s steps and guidance: the command line's, or else the run's (sample.Models)."""
    content_steps, motion_steps = sample.steps_of(args)
    return dict(content_steps=content_steps or models.content_steps, motion_steps=motion_steps or models.motion_steps,
                cfg_content=models.cfg_content if args.cfg_content is None else args.cfg_content,
                cfg_motion=models.cfg_motion if args.cfg_motion is None else args.cfg_motion)


def generated_batches(models, prompts, n, batch_size, sampling, args, device):
    """n videos generated by sample.generate (Algorithm 1), video i from prompts[i % len(prompts)];
    one generator seeded once, so the set depends on --seed and --batch-size only."""
    generator = torch.Generator(device).manual_seed(args.seed)
    for i in range(0, n, batch_size):
        chunk = [prompts[k % len(prompts)] for k in range(i, min(i + batch_size, n))]
        with sample.autocast_for(device, args.dtype):
            videos, _ = sample.generate(models, chunk, **sampling, generator=generator,
                                        progress=False)
        run = args.run or sample.DEFAULT_RUN
        yield [check_length(video, f"a video of {run}") for video in data.video_to_uint8(videos)], chunk


# ----------------------------------------------------------------------------- cached real features

def save_real(path, features, captions, protocol):
    np.savez(path, features=features, captions=np.array(captions), protocol=json.dumps(protocol))


def load_real(path, n, size, convention):
    """(features, captions) cached by --save-features, checked to match this evaluation."""
    try:
        with np.load(path) as cached:
            features, captions = cached["features"], cached["captions"].tolist()
            protocol = json.loads(str(cached["protocol"]))
    except (OSError, ValueError, KeyError) as e:
        raise InputError(f"--real-features {path}: not features saved by --save-features ({e})") from e
    if len(features) != n or tuple(protocol["size"]) != tuple(size) or protocol["fvd"] != convention:
        raise InputError(f"--real-features {path} holds {len(features)} videos at {protocol['size']} under --fvd "
                         f"{protocol['fvd']}, this evaluation wants {n} at {list(size)} under --fvd {convention}")
    return features, captions


# ----------------------------------------------------------------------------- command line

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    generated = parser.add_argument_group("generated videos: a folder, or a run that generates them")
    generated.add_argument("--videos", metavar="DIR", help="a folder of generated videos, the first N in name order")
    sample.add_sampling_args(generated)
    generated.add_argument("--prompts", metavar="FILE",
                           help="one prompt a line, video i gets line i (cycling); default: a class-conditional "
                                "run's classes, uniformly; otherwise the real videos' captions")
    generated.add_argument("--num-videos", type=int, default=2048, metavar="N", help="videos per set (default 2048)")
    generated.add_argument("--batch-size", type=int, default=16, help="videos generated and scored at once")
    fvd = parser.add_argument_group("FVD: Kinetics-400 I3D features of 16 frames")
    fvd.add_argument("--i3d", metavar="PATH", help="StyleGAN-V's i3d_torchscript.pt (Kinetics-400)")
    fvd.add_argument("--fvd", choices=("stylegan-v", "pvdm"), default="stylegan-v",
                     help="stylegan-v: its fvd2048_16f, whole uint8 clips, the network resizes, biased covariance "
                          "(most papers); pvdm: PVDM's and the CMD release's, 224 centre crop in [-1, 1], unbiased")
    fvd.add_argument("--data", help="the real videos: a dataset spec as the stages' --data")
    fvd.add_argument("--split", default="val", choices=("val", "train", "all"),
                     help="val: what training holds out (UCF-101: testlist01); train: the training videos (the "
                          "release's and TATS' UCF-101 real set); all: the whole listing (UCF-101 train+test as "
                          "StyleGAN-V's; WebVid's val CSV)")
    fvd.add_argument("--val-fraction", type=float, default=data.VAL_FRACTION,
                     help=f"held-out share of a listing without an official split, as in training "
                          f"(default {data.VAL_FRACTION})")
    fvd.add_argument("--data-seed", type=int, default=0,
                     help="the --seed the stages trained with: with --val-fraction it picks the held-out videos "
                          "(default 0)")
    fvd.add_argument("--save-features", metavar="NPZ", help="write the real set's features, to reuse")
    fvd.add_argument("--real-features", metavar="NPZ", help="read the real set's features instead of --data")
    clipsim = parser.add_argument_group("CLIPSIM: mean cosine of each frame with its prompt, raw (not x100)")
    clipsim.add_argument("--clip-weights", metavar="PATH", help="a local open_clip checkpoint")
    clipsim.add_argument("--clip-model", default="ViT-B-32",
                         help="open_clip model name (default ViT-B-32; OpenAI's weights: ViT-B-32-quickgelu)")
    shapes = parser.add_argument_group("the shapes world")
    shapes.add_argument("--shapes", type=int, metavar="N", help="score N generated shapes videos (tools/shapes.py)")
    shapes.add_argument("--motion-transfer", type=int, metavar="N",
                        help="score N shapes videos re-dressed by a prompt with a real video's motion")
    args = parser.parse_args(argv)
    if args.motion_transfer is not None:
        if args.motion_transfer < 1 or args.shapes or args.i3d or args.clip_weights or args.videos or args.data:
            parser.error("--motion-transfer N (N > 0) takes a --run, and no other metric or data")
        return args
    if args.shapes is not None:
        if args.shapes < 1 or any((args.videos, args.data, args.prompts, args.clip_weights, args.real_features)):
            parser.error("--shapes N (N > 0) takes a --run and optionally --i3d; not --videos, --data, --prompts, "
                         "--clip-weights or --real-features")
        return args
    if not (args.i3d or args.clip_weights):
        parser.error("ask for FVD (--i3d), CLIPSIM (--clip-weights), or both; or give --shapes N")
    if args.videos and args.run:
        parser.error("the generated videos come from --videos DIR or from --run DIR, not both")
    if args.i3d and (args.data is None) == (args.real_features is None):
        parser.error("FVD needs the real set: --data SPEC or --real-features NPZ")
    if args.save_features and not args.data:
        parser.error("--save-features writes the features of --data")
    if args.clip_weights and args.videos and not args.prompts:
        parser.error("CLIPSIM on --videos needs their --prompts")
    if args.clip_weights and not (args.videos or args.prompts or args.i3d):
        parser.error("CLIPSIM needs --prompts (or FVD's real set, whose captions become the prompts)")
    if min(args.num_videos, args.batch_size, *(s for s in (args.steps, args.content_steps, args.motion_steps)
                                                if s is not None)) < 1:
        parser.error("--num-videos, --batch-size and the steps want positive numbers")
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        data.fail("--device cuda, but PyTorch sees no CUDA GPU: use --device cpu")
    start = time.time()
    try:
        if args.motion_transfer:
            result = run_motion_transfer(args, device)
        else:
            result = run_shapes(args, device) if args.shapes else evaluate(args, device)
    except (InputError, data.VideoError) as e:
        data.fail(e)
    print(json.dumps({**result, "seconds": round(time.time() - start, 1)}))  # the last line of stdout


def run_shapes(args, device):
    """The shapes evaluation (tools/shapes.py); with --i3d also the FVD of its generated videos
    against the real videos of the same captions."""
    detector = load_i3d(args.i3d, device) if args.i3d else None
    models = sample.load_run(args.run, device, args.resolution, args.compile)
    summary, videos = evaluate_shapes(models, args.shapes, sampling_of(args, models),
                                      torch.Generator(device).manual_seed(args.seed),
                                      sample.autocast_for(device, args.dtype), device, args.batch_size)
    if detector is not None:
        features = {name: score(array_batches(v, args.batch_size), len(v), detector, None, device, name, args.fvd)[0]
                    for name, v in videos.items()}  # generated, real
        summary.update(fvd=frechet_distance(features["generated"], features["real"], args.fvd), fvd_convention=args.fvd)
    return summary


def run_motion_transfer(args, device):
    """The shapes world's motion transfer (tools/shapes.py): real videos' motion, prompted content."""
    models = sample.load_run(args.run, device, args.resolution, args.compile)
    return evaluate_motion_transfer(models, args.motion_transfer, sampling_of(args, models),
                                    torch.Generator(device).manual_seed(args.seed),
                                    sample.autocast_for(device, args.dtype), device, args.batch_size)


def array_batches(videos, batch_size):
    """uint8 (n, L, H, W, 3) -> batches of (videos, no prompts)."""
    return (([check_length(v, "a shapes video") for v in videos[i:i + batch_size]], None)
            for i in range(0, len(videos), batch_size))


def evaluate(args, device):
    """FVD and/or CLIPSIM of N generated videos -> the JSON line's dict."""
    n = args.num_videos
    detector = load_i3d(args.i3d, device) if args.i3d else None  # the networks first: their errors come fast
    clip = load_clip(args.clip_model, args.clip_weights, device) if args.clip_weights else None
    if args.videos:
        paths = video_files(args.videos, n)
        size = tuple(check_length(data.read_video(paths[0]), paths[0]).shape[1:3])
    else:
        models = sample.load_run(args.run, device, args.resolution, args.compile)
        size = models.ae.config.video_size
    protocol = {"frames": FRAMES, "seed": args.seed, "size": list(size)}
    real_features, captions = real_set_features(args, detector, size, protocol, device) if detector else (None, None)
    prompts = sample.read_prompts(args) if args.prompts else captions
    if not args.prompts and not args.videos and "classes" in getattr(models.text_encoder, "config", {}):
        prompts = models.text_encoder.config["classes"]  # every class as often (TATS' random subset: about so)
        protocol["prompts"] = f"its {len(prompts)} classes, uniformly"
    if args.videos:
        batches = file_batches(paths, prompts, args.batch_size)
    else:
        sampling = sampling_of(args, models)
        protocol.update(run=str(args.run or sample.DEFAULT_RUN), **sampling)
        batches = generated_batches(models, prompts, n, args.batch_size, sampling, args, device)
    features, similarities, _ = score(batches, n, detector, clip, device, "generated", args.fvd)
    result = {"n": n}
    if detector is not None:
        result["fvd"] = frechet_distance(features, real_features, args.fvd)
    if clip is not None:
        result["clipsim"] = float(similarities.mean())
        protocol.update(clip_model=args.clip_model, clipsim_scale="raw cosine in [-1, 1], not x100")
        print(f"CLIPSIM {result['clipsim']:.4f}: the raw cosine; x100, as most papers print it, "
              f"{100 * result['clipsim']:.2f}")
    return {**result, "protocol": protocol}


def real_set_features(args, detector, size, protocol, device):
    """I3D features (N, d) of the real set and its captions: read from --real-features, or computed
    from --data's held-out split (and then saved to --save-features if asked)."""
    protocol.update(fvd=args.fvd, i3d=Path(args.i3d).name, i3d_sha256=sha256(args.i3d),
                    covariance="biased (StyleGAN-V)" if args.fvd == "stylegan-v" else "unbiased (PVDM)",
                    real=args.real_features or f"{args.data} ({args.split})")
    if protocol["i3d_sha256"] != I3D_SHA256:
        print(f"note: {args.i3d} is not the i3d_torchscript.pt other FVD code uses (its sha256 differs): "
              "this FVD compares with no paper's")
    if args.real_features:
        return load_real(args.real_features, args.num_videos, size, args.fvd)
    dataset, indices = real_set(args, size)
    torch.manual_seed(args.seed)  # the real clips' start frames
    features, _, captions = score(real_batches(dataset, indices, args.batch_size), len(indices), detector, None,
                                  device, "real", args.fvd)
    if args.save_features:
        save_real(args.save_features, features, captions, {**protocol, "n": len(indices), "data": args.data})
    return features, captions


if __name__ == "__main__":
    main()

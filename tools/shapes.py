"""The shapes evaluation: does a generated video show the colour, shape, motion and background its
prompt asks for, and is it as clean as the AE's reconstructions?

`evaluate_shapes` generates videos from captions of known attributes through sample.generate, and
reads them back with the analytic detector `detect` below; its content frames alone are read as
still images (`detect_still`). The detector's own error rate is measured on real videos of the
shapes world (exact), and the AE's on AE reconstructions of them (the best the generator could do).
Two measures of how a frame looks, on the uint8 frames: background speckle (`speckle`) and ghosts
(`ghost_share`). The command line is `python tools/evaluate.py --shapes N`.
"""
import itertools
import random
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the stage files live one folder up
from data import (BACKGROUNDS, COLORS, HELDOUT_COMBOS, MOTIONS, SHAPES, ShapesDataset, caption_for,  # noqa: E402
                  render_shapes, uint8_to_video, video_to_uint8)
from sample import generate  # noqa: E402

# ----------------------------------------------------------------------------- the detector
# Reads (colour, shape, motion, background) back from a one-shape video of the shapes world (data.py).
# Measured on real videos it is exact (test_cmd.py), so accuracy on generated videos measures the
# model, not the detector.

PALETTE = np.array(list(COLORS.values()), np.float64)  # (K, 3)
HARMONIC = {"triangle": (3, 0.53), "square": (4, 0.27)}  # (n, a drawn shape's n-fold symmetry, below)


def neighbours(mask):
    """How many pixels of each 3x3 neighbourhood (itself included) are set: (L, H, W) -> (L, H, W)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    return np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(1, 2)).sum((-2, -1))


def background_rows(video):
    """uint8 (L, H, W, 3) -> the background, one colour per row (H, 3) (a gradient runs top to bottom):
    the median of the two leftmost and rightmost columns over all frames, which the shapes world keeps free."""
    width = video.shape[2]
    return np.median(video[:, :, [0, 1, width - 2, width - 1]].astype(np.float64), axis=(0, 2))


def background_name(rows):
    """Rows (H, 3) -> the nearest of the shapes world's backgrounds, "dark", "light" or "gradient"."""
    drawn = {name: render_shapes({"background": name, "shapes": []}, len(rows), 1)[0, :, 0] for name in BACKGROUNDS}
    return min(drawn, key=lambda name: ((rows - drawn[name]) ** 2).mean())


def colour_and_coverage(video):
    """uint8 (L, H, W, 3) -> (the drawn colour's name, its coverage alpha (L, H, W) in [0, 1]);
    ("none", zeros) if nothing is drawn."""
    v = video.astype(np.float64)
    background = background_rows(video)  # (H, 3)
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

    # Shape: the symmetry strongest relative to a drawn shape's; a circle if neither reaches 30% of it,
    # between what a drawn circle scores and what a square keeps when blurred (a circle has neither).
    scores = {shape: symmetry(n) / strength for shape, (n, strength) in HARMONIC.items()}
    shape = max(scores, key=scores.get) if max(scores.values()) > 0.3 else "circle"
    # Motion: least-squares slopes of the centroid and of log area over the frames that show the
    # shape, so that no single frame decides. A shape whose centroid travels > 10% of the frame
    # moves (drawn ones travel a quarter, data.TRAVEL); otherwise its area grows (drawn: x4), shrinks
    # (x1/4) or stays: rotation.
    track = np.stack([cx, cy, np.log(area)], 1)[seen]  # (frames seen, 3)
    slope_x, slope_y, slope_area = np.polyfit(np.arange(length)[seen], track, 1)[0] * (length - 1)
    if max(abs(slope_x), abs(slope_y)) > 0.1 * width:
        if abs(slope_x) > abs(slope_y):
            return shape, "right" if slope_x > 0 else "left"
        return shape, "down" if slope_y > 0 else "up"  # image y points down
    return shape, "growing" if slope_area > np.log(1.25) else "shrinking" if slope_area < np.log(0.8) else "rotating"


def detect(video):
    """uint8 (L, H, W, 3) of one shape -> (colour, shape, motion, background) names, "none" for what is
    not there."""
    colour, alpha = colour_and_coverage(video)
    return (colour, *shape_and_motion(alpha), background_name(background_rows(video)))


def detect_still(image):
    """uint8 (H, W, 3), a content frame, read as a still video -> (colour, shape, "none", background)."""
    colour, shape, _, background = detect(np.stack([image, image]))
    return colour, shape, "none", background


# ----------------------------------------------------------------------------- how clean a frame is

def speckle(video):
    """Background speckle, in 0-255 units: the mean absolute deviation of the background's pixels, away
    from the shape, from their row's median in that frame (a flat or a gradient background is constant
    along a row). NaN where nothing reads as background."""
    v = video.astype(np.float64)
    _, alpha = colour_and_coverage(video)
    away = ~ndimage.binary_dilation(alpha > 0, np.ones((1, 3, 3)), iterations=2)  # 2 pixels off the shape
    deviations = []
    for frame, keep in zip(v, away):
        for row, kept in zip(frame, keep):
            if kept.any():
                deviations.append(np.abs(row[kept] - np.median(row[kept], axis=0)).mean())
    return float(np.mean(deviations)) if deviations else float("nan")


def ghost_frames(video, colour):
    """For each frame, whether `colour` forms more than one blob in it (8-connected pixels mostly of that
    colour, two or more of them): a shape split in two, or a ghost left where it was. -> bool (L,)"""
    background = background_rows(video)  # (H, 3)
    towards = np.array(COLORS[colour], np.float64) - background
    alpha = ((video - background[:, None]) * towards[:, None]).sum(-1) / (towards ** 2).sum(-1)[:, None]
    blobs = [ndimage.label(frame > 0.5, structure=np.ones((3, 3)))[0] for frame in alpha]
    return np.array([(np.bincount(labels.ravel())[1:] >= 2).sum() > 1 for labels in blobs])


def ghost_share(video, colour):
    """The share of frames with a ghost (ghost_frames)."""
    return float(ghost_frames(video, colour).mean())



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


ATTRIBUTES = ("color", "shape", "motion", "background")


def accuracy(predictions, truth):
    """-> the accuracy of each of ATTRIBUTES."""
    return [float(np.mean([p[k] == t[k] for p, t in zip(predictions, truth)])) for k in range(len(ATTRIBUTES))]


@torch.no_grad()
def evaluate_shapes(models, n, sampling, generator, autocast, device, batch_size=16):
    """Generate n shapes videos from captions (sample.generate) and detect their attributes; read their
    content frames alone as still images (the content stage alone: colour, shape and background); detect
    the same for real videos of the same attributes and for their AE reconstructions (the best the
    generator could do), and for the motion stage alone: the DiT's motion latent for the real video's
    content frame. Measure speckle and ghosts. `sampling`: generate()'s steps and guidance. Prints the
    tables; returns (summary dict, {"generated": videos, "real": videos}), videos np.uint8 (n, L, H, W, 3)."""
    specs = eval_specs(n)
    attributes = real_attributes(specs)
    prompts = [caption_for(a) for a in attributes]
    ae, frame_space = models.ae, models.frame_space
    size = ae.config.video_size[0]  # pixels: the shapes world is square
    videos = {"generated": [], "motion": [], "ae": [], "real": []}
    content_frames = []
    # the motion stage alone draws its noise from a generator of its own: "generated" stays as it was
    motion_generator = torch.Generator(generator.device).manual_seed(generator.initial_seed() + 1)
    for i in tqdm(range(0, n, batch_size), desc=f"eval ({batch_size} videos a batch)"):
        real = np.stack([render_shapes(x, size, ae.config.frames) for x in attributes[i:i + batch_size]])
        batch = prompts[i:i + batch_size]
        with autocast:
            generated, content_images = generate(models, batch, **sampling, generator=generator, progress=False)
            content_frame, motion_latent = ae.encode(frame_space.encode(uint8_to_video(real).to(device)))
            made = {"generated": generated,
                    "motion": generate(models, batch, **sampling, generator=motion_generator, progress=False,
                                       content_frame=content_frame)[0],
                    "ae": frame_space.decode(ae.decode(content_frame, motion_latent))}
        for name, video in made.items():
            videos[name].append(video_to_uint8(video))
        videos["real"].append(real)
        content_frames.append(video_to_uint8(content_images))
    videos = {k: np.concatenate(v) for k, v in videos.items()}
    found = {name: [detect(video) for video in batch] for name, batch in videos.items()}
    found["content"] = [detect_still(image) for image in np.concatenate(content_frames)]
    held_out = [i for i, s in enumerate(specs) if s[:3] in HELDOUT_COMBOS]
    rows = [("generated", "", found["generated"], specs),
            ("generated, held-out combos", "heldout_", [found["generated"][i] for i in held_out],
             [specs[i] for i in held_out]),
            ("content stage alone: its content frame as a still image", "content_", found["content"], specs),
            ("motion stage alone: its motion for the real content frame", "motion_", found["motion"], specs),
            ("AE reconstructions", "ae_", found["ae"], specs), ("real videos", "real_", found["real"], specs)]
    summary = {"n": n, "heldout_n": len(held_out), **sampling}
    print("| videos | n | colour | shape | motion | background |\n|---|---|---|---|---|---|")
    for name, prefix, predictions, truth in rows:
        scores = dict(zip(ATTRIBUTES, accuracy(predictions, truth)))
        if prefix == "content_":
            del scores["motion"]  # a still image has none
        print(f"| {name} | {len(truth)} | " + " | ".join(f"{scores[k]:.3f}" if k in scores else "-"
                                                         for k in ATTRIBUTES) + " |")
        summary.update({f"{prefix}{k}_acc": x for k, x in scores.items()})
    print("\n| videos | background speckle (0-255) | frames with ghosts |\n|---|---|---|")
    for name, key, prefix in (("generated", "generated", ""), ("motion stage alone", "motion", "motion_"),
                              ("AE reconstructions", "ae", "ae_"), ("real videos", "real", "real_")):
        speckles = [s for s in map(speckle, videos[key]) if not np.isnan(s)]  # the videos with a background
        summary[f"{prefix}speckle"] = float(np.mean(speckles)) if speckles else None
        summary[f"{prefix}ghosts"] = float(np.mean([ghost_share(v, spec[0]) for v, spec in zip(videos[key], specs)]))
        shown = "-" if summary[f"{prefix}speckle"] is None else f"{summary[f'{prefix}speckle']:.2f}"
        print(f"| {name} | {shown} | {summary[f'{prefix}ghosts']:.3f} |")
    # Where the generated videos' ghosts are: by frame index (the content frame is pulled to the middle
    # one, data.TURN) and by the prompted motion.
    ghosts = np.stack([ghost_frames(video, spec[0]) for video, spec in zip(videos["generated"], specs)])
    summary["ghosts_by_frame"] = [round(float(x), 4) for x in ghosts.mean(0)]
    summary["ghosts_by_motion"] = {m: round(float(ghosts[[s[2] == m for s in specs]].mean()), 4)
                                   for m in MOTIONS if m in {s[2] for s in specs}}
    print("\nframes with ghosts, generated, by frame index:", " ".join(f"{x:.2f}" for x in summary["ghosts_by_frame"]))
    print("by motion:", ", ".join(f"{m} {x:.3f}" for m, x in summary["ghosts_by_motion"].items()))
    return summary, {"generated": videos["generated"], "real": videos["real"]}


@torch.no_grad()
def evaluate_motion_transfer(models, n, sampling, generator, autocast, device, batch_size=16):
    """Motion transfer on the shapes world: the motion latent of a real video (the AE's encoder) with a
    content frame generated for a prompt of the same motion but another colour and shape. Prints a
    table; returns its numbers: a transfer that works shows the prompt's colour and shape and the
    source's motion, one that does not carries the source's colour or shape along."""
    targets = eval_specs(n)
    rng = random.Random(1)
    sources = [(rng.choice([c for c in COLORS if c != colour]),
                rng.choice([s for s in SHAPES if s != shape and (s, motion) != ("circle", "rotating")]), motion, bg)
               for colour, shape, motion, bg in targets]
    attributes = real_attributes(sources)
    prompts = [caption_for({"background": bg, "shapes": [{"color": c, "shape": s, "motion": m}]})
               for c, s, m, bg in targets]
    ae, frame_space = models.ae, models.frame_space
    found = []
    for i in tqdm(range(0, n, batch_size), desc=f"motion transfer ({batch_size} videos a batch)"):
        real = np.stack([render_shapes(x, ae.config.video_size[0], ae.config.frames)
                         for x in attributes[i:i + batch_size]])
        with autocast:
            motion_latent = ae.encode(frame_space.encode(uint8_to_video(real).to(device)))[1]
            generated, _ = generate(models, prompts[i:i + batch_size], **sampling, generator=generator,
                                    progress=False, motion_latent=motion_latent)
        found += [detect(video) for video in video_to_uint8(generated)]
    summary = {"n": n, **sampling,
               "color_is_prompts": accuracy(found, targets)[0], "color_is_sources": accuracy(found, sources)[0],
               "shape_is_prompts": accuracy(found, targets)[1], "shape_is_sources": accuracy(found, sources)[1],
               "motion_is_sources": accuracy(found, sources)[2]}
    print("| motion transfer | n | colour | shape | motion |\n|---|---|---|---|---|")
    print(f"| as the prompt asks | {n} | {summary['color_is_prompts']:.3f} | {summary['shape_is_prompts']:.3f} | "
          f"{summary['motion_is_sources']:.3f} |")
    print(f"| as the source video's | {n} | {summary['color_is_sources']:.3f} | {summary['shape_is_sources']:.3f} | "
          f"{summary['motion_is_sources']:.3f} |")
    return summary

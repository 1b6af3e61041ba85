"""`tessera eval`: FID, Inception Score, CLIP score, attribute accuracy and PSNR/SSIM of images.

    tessera eval --images DIR_OR_GLOB --reference SHARDS_OR_DIR [--clip PATH] [--inception PATH]
                 [--paired] --output report.json

Feature space. FID and IS are defined on Inception-v3 (Heusel et al. 2017; Salimans et al. 2016).
Inception weights are used only from a local file given with `--inception` (nothing is downloaded):
a state dict in torchvision's `Inception3` naming, saved with torch.save (loaded with
weights_only=True) or as .safetensors. The network is trainer/inception.py (plain torch, torchvision
is not needed), which takes either torchvision's ImageNet inception_v3 weights (fc with 1000 classes)
or the TensorFlow FID weights as ported by pytorch-fid (pt_inception-2015-12-05, fc with 1008
classes; only these give FIDs comparable with published ones), told apart by the fc shape and
recorded as `inception_variant`. Images are resized bilinearly to 299x299; FID is on the 2048 pool
features, IS on the classifier's softmax (for the FID weights over all 1008 classes without the fc
bias, as the original IS code). Without weights, both are computed with the
project's CLIP and labelled as such: `fid_clip` is the Frechet distance between Gaussians fitted to
unit-norm CLIP image embeddings (as FID_CLIP in Kynkaenniemi et al. 2023), and `is_clip` is
exp(E_x KL(p(y|x) || p(y))) with p(y|x) the CLIP's softmax over the distinct captions (reference and
generated) as classes. Values in the two spaces are not comparable with each other or with published FIDs.

CLIP score: mean cosine similarity of each image with its caption (`clip_score`), beside the same
figure for the reference images with theirs (`clip_score_reference`) for scale.

Attributes: when captions are synthetic-dataset captions, `tessera.dataprep.detector` scores colour,
shape, size and position agreement (`attributes`).

PSNR / SSIM (`--paired`): image i against reference i (e.g. dVAE reconstructions of held-out
images), with `tessera.trainer.image_metrics`.

Where captions come from: an images folder written by `tessera sample` (`NNN_KK.png` +
`prompts.txt`), per-image `{stem}.txt` files, or webdataset shards (`{key}.txt`).
"""

from __future__ import annotations

import glob
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

from tessera.core.errors import InputError
from tessera.core.files import atomic_write_bytes
from tessera.dataprep import detector
from tessera.dataprep.shards import crop_resize, first_image_size, read_pairs
from tessera.dataprep.storage import is_s3
from tessera.dataprep.synthetic import parse_caption
from tessera.trainer.clip import load_clip
from tessera.trainer.image_metrics import psnr, ssim
from tessera.trainer.inception import load_inception

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp"}
SKIP_NAMES = {"grid.png"}


# --------------------------------------------------------------------------------------------
# Loading images (and captions when known)


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        raise InputError(f"image '{path}' cannot be decoded") from None


def _to_batch(arrays: list[np.ndarray], size: int | None) -> torch.Tensor:
    """uint8 (N, 3, S, S); images of another size are center-cropped and resized to `size` (default: the first's)."""
    if not arrays:
        return torch.zeros(0, 3, size or 1, size or 1, dtype=torch.uint8)
    size = size or min(arrays[0].shape[:2])
    out = []
    for a in arrays:
        if a.shape[:2] != (size, size):
            a = np.asarray(crop_resize(Image.fromarray(a), size))
        out.append(a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out))


def _is_shards(spec: str) -> bool:
    """Webdataset shards rather than image files: s3://, a tar, a folder holding tars, or a pattern of tars."""
    if is_s3(spec):
        return True
    p = Path(spec)
    if p.is_dir():
        return any(p.glob("*.tar"))
    return p.suffix == ".tar" if p.is_file() else spec.endswith(".tar")


def load_images(spec: str | Path, size: int | None = None, limit: int | None = None) -> tuple[torch.Tensor, list[str | None]]:
    """(uint8 images (N, 3, S, S), captions or None each) from a folder, a glob, or webdataset shards (any shard spec, s3:// too)."""
    spec = str(spec)
    if _is_shards(spec):
        imgs, caps = read_pairs(spec, size or first_image_size(spec), limit)
        return imgs, list(caps)
    p = Path(spec)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.name not in SKIP_NAMES)
        if not files:
            raise InputError(f"image folder '{p}' holds no images ({', '.join(sorted(IMAGE_EXTS))}) or *.tar shards")
    else:
        files = sorted(Path(f) for f in glob.glob(spec) if Path(f).suffix.lower() in IMAGE_EXTS and Path(f).name not in SKIP_NAMES)
        if not files:
            raise InputError(f"images '{spec}' match no image file")
    if limit:
        files = files[:limit]
    return _to_batch([_load_image(f) for f in files], size), _file_captions(files)


def _file_captions(files: list[Path]) -> list[str | None]:
    """Each image's caption: its `{stem}.txt`, else line NNN of its folder's prompts.txt for `NNN_KK.png`, else None."""
    prompts_cache: dict[Path, list[str] | None] = {}
    captions: list[str | None] = []
    for f in files:
        side = f.with_suffix(".txt")
        if side.is_file():
            captions.append(side.read_text(encoding="utf-8", errors="replace").strip())
            continue
        if f.parent not in prompts_cache:
            pf = f.parent / "prompts.txt"
            prompts_cache[f.parent] = (
                [ln.strip() for ln in pf.read_text(encoding="utf-8").splitlines() if ln.strip()] if pf.is_file() else None
            )
        prompts = prompts_cache[f.parent]
        m = re.fullmatch(r"(\d+)_(\d+)", f.stem)
        captions.append(prompts[int(m.group(1))] if prompts and m and int(m.group(1)) < len(prompts) else None)
    return captions


# --------------------------------------------------------------------------------------------
# Metrics on features


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64.

    ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a^1/2 S_b S_a^1/2)^1/2), the matrix square
    roots from symmetric eigendecompositions (negative eigenvalues from rounding clipped to 0).

    With fewer samples than dimensions on one side (e.g. a few hundred images in Inception's 2048-D
    space) the same value comes from the small matrices instead: with X_a, X_b the centred features
    scaled by 1/sqrt(N-1), 1/sqrt(M-1), the nonzero eigenvalues of S_a S_b are those of G G^T,
    G = X_a X_b^T (N x M), so Tr(...)^1/2 = sum sqrt(eig(G G^T)), without any D x D eigendecomposition.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"frechet_distance: expected (N, D) and (M, D) features, got {tuple(a.shape)} and {tuple(b.shape)}")
    if len(a) < 2 or len(b) < 2:
        raise InputError(f"frechet_distance: need >= 2 samples on each side, got {len(a)} and {len(b)}")
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    if min(len(a), len(b)) < a.shape[1]:
        xa, xb = (a - mu_a) / math.sqrt(len(a) - 1), (b - mu_b) / math.sqrt(len(b) - 1)
        g = xa @ xb.t()
        small = g @ g.t() if len(a) <= len(b) else g.t() @ g
        tr_covmean = torch.linalg.eigvalsh((small + small.t()) / 2).clamp_min(0).sqrt().sum()
        fd = (mu_a - mu_b).pow(2).sum() + xa.pow(2).sum() + xb.pow(2).sum() - 2 * tr_covmean
        return max(float(fd), 0.0)
    s_a, s_b = torch.cov(a.t()), torch.cov(b.t())
    if s_a.dim() == 0:
        s_a, s_b = s_a.view(1, 1), s_b.view(1, 1)
    ev, vec = torch.linalg.eigh(s_a)
    root_a = (vec * ev.clamp_min(0).sqrt()) @ vec.t()
    mid = root_a @ s_b @ root_a
    tr_covmean = torch.linalg.eigvalsh((mid + mid.t()) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * tr_covmean
    return max(float(fd), 0.0)


def inception_score(probs: torch.Tensor, splits: int = 1) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) from class probabilities (N, K): mean and std over `splits` folds."""
    if probs.dim() != 2 or len(probs) == 0:
        raise InputError(f"inception_score: expected (N, K) probabilities, got {tuple(probs.shape)}")
    p = probs.double().clamp_min(1e-12)
    scores = []
    for part in torch.chunk(p, max(1, min(splits, len(p)))):
        py = part.mean(0, keepdim=True)
        kl = (part * (part.log() - py.log())).sum(1).mean()
        scores.append(math.exp(float(kl)))
    return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------------------------
# Inception (local weights only)


class InceptionFeatures:
    """Inception-v3 (trainer/inception.py, no torchvision) with weights from a local file: pool features and class probabilities.

    path: a state dict in torchvision's `Inception3` naming, saved with torch.save (read with
    weights_only=True) or as .safetensors: torchvision's ImageNet weights or pytorch-fid's FID weights
    (fc with 1008 classes). variant: "torchvision", "fid", or None to pick from the fc shape.
    """

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", variant: str | None = None):
        p = Path(path)
        if not p.is_file():
            raise InputError(f"Inception weights '{p}' do not exist")
        try:
            if p.suffix == ".safetensors":
                sd = load_file(p)
            else:
                sd = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(
                f"Inception weights '{p}' cannot be read: truncated, or not a torch.save state dict / .safetensors file ({type(e).__name__})"
            ) from None
        try:
            net = load_inception(sd, variant)
        except ValueError as e:
            raise InputError(f"Inception weights '{p}' do not fit Inception-v3: {str(e).splitlines()[0]}") from None
        self.path = p
        self.variant = net.variant
        self.device = torch.device(device)
        self.net = net.to(self.device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, 3, H, W) float in [0, 1] (uint8 is scaled) -> (features (N, 2048), probabilities (N, K)), on the CPU."""
        feats, probs = [], []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size].to(self.device)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            f, p = self.net(x)
            feats.append(f.float().cpu())
            probs.append(p.float().cpu())
        return torch.cat(feats), torch.cat(probs)


# --------------------------------------------------------------------------------------------
# The evaluation


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def evaluate(
    images: torch.Tensor,
    captions: Sequence[str | None],
    reference: torch.Tensor,
    reference_captions: Sequence[str | None],
    *,
    clip: Any = None,
    inception: Any = None,
    paired: bool = False,
    is_splits: int = 1,
) -> dict[str, Any]:
    """All metrics that the inputs allow. images/reference: (N, 3, H, W) uint8 or float in [0, 1].

    clip: a ClipScorer or None; inception: an InceptionFeatures or None.
    """
    if len(images) == 0 or len(reference) == 0:
        raise InputError(f"eval: need images on both sides, got {len(images)} generated and {len(reference)} reference")
    x, r = _float(images), _float(reference)
    report: dict[str, Any] = {"n_images": len(x), "n_reference": len(r)}
    if inception is not None:
        fx, px = inception(x)
        fr, _ = inception(r)
        report["feature_space"] = "inception"
        report["inception_variant"] = getattr(inception, "variant", "unknown")
        report["fid"] = frechet_distance(fx, fr)
        report["is"], report["is_std"] = inception_score(px, is_splits)
    if clip is not None:
        ex, er = clip.image_embeddings(x), clip.image_embeddings(r)
        report.setdefault("feature_space", "clip")
        report["fid_clip"] = frechet_distance(ex, er)
        # classes: every distinct caption on either side (held-out prompts are not among the reference's)
        classes = sorted({c for c in reference_captions if c} | {c for c in captions if c})
        if classes:
            t = clip.text_embeddings(classes)
            scale = float(clip.model.logit_scale.detach().clamp(max=math.log(100.0)).exp())
            report["is_clip"], report["is_clip_std"] = inception_score((scale * ex @ t.t()).softmax(-1), is_splits)
            report["is_clip_classes"] = len(classes)
        have = [i for i, c in enumerate(captions) if c]
        if have:
            report["clip_score"] = float(clip.score(x[have], [captions[i] for i in have]).mean())
        have_r = [i for i, c in enumerate(reference_captions) if c]
        if have_r:
            report["clip_score_reference"] = float(clip.score(r[have_r], [reference_captions[i] for i in have_r]).mean())
    parsed = [(i, parse_caption(c)) for i, c in enumerate(captions) if c]
    parsed = [(i, a) for i, a in parsed if a is not None]
    if parsed:
        acc = detector.score(x[[i for i, _ in parsed]], [a for _, a in parsed])
        report["attributes"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in acc.items()}
    if paired:
        if x.shape != r.shape:
            raise InputError(f"eval --paired: generated images {tuple(x.shape)} and reference {tuple(r.shape)} differ in count or size")
        report["psnr"] = float(psnr(x, r).mean())
        report["ssim"] = float(ssim(x, r).mean())
    return report


def format_table(report: dict[str, Any]) -> str:
    rows = []
    for k, v in report.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                rows.append((f"{k}.{kk}", vv))
        else:
            rows.append((k, v))
    width = max(len(k) for k, _ in rows)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  -----"]
    for k, v in rows:
        lines.append(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    return "\n".join(lines)


def evaluate_to_file(
    images: str | Path,
    reference: str | Path,
    output: str | Path,
    *,
    clip: str | Path | None = None,
    inception: str | Path | None = None,
    paired: bool = False,
    size: int | None = None,
    limit: int | None = None,
    is_splits: int = 1,
) -> dict[str, Any]:
    """`tessera eval`: load both image sets, compute the metrics, write the report JSON atomically and return it."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen, caps = load_images(images, size, limit)
    ref, ref_caps = load_images(reference, gen.shape[-1], limit)
    scorer = load_clip(clip, device) if clip else None
    feats = InceptionFeatures(inception, device) if inception else None
    report = evaluate(gen, caps, ref, ref_caps, clip=scorer, inception=feats, paired=paired, is_splits=is_splits)
    report.update(images=str(images), reference=str(reference))
    if scorer is not None:
        report["clip"] = str(clip)
    if feats is not None:
        report["inception"] = str(inception)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, (json.dumps(report, indent=2) + "\n").encode())
    return report


__all__ = ["evaluate", "evaluate_to_file", "frechet_distance", "inception_score", "load_images", "InceptionFeatures", "format_table"]

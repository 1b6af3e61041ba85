"""A small CLIP (Radford et al. 2021): a conv image tower and a text transformer over BPE ids,
trained contrastively. Tessera uses it to rerank samples (DALL-E section 2.5), for the crawler's
image-text similarity filter, and for evaluation (CLIP score, CLIP-feature FID).

    image (B, 3, S, S) in [0, 1] -> ImageTower -> (B, E)  \\
                                                           > cosine similarities * exp(logit_scale)
    ids (B, L) long, 0 = padding -> TextTower  -> (B, E)  /

The image tower keeps where things are: it flattens its final 4x4 feature map instead of
average-pooling it, since positions ("at the top left") are part of the captions. No image
augmentation either, for the same reason (a flip would swap left and right).

Checkpoints (kind "clip") hold the state dict, the ClipConfig, the text vocabulary size and the
tokenizer itself (model bytes and sidecar), so `load_clip(path)` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

from tessera.core.config import from_dict
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import load_checkpoint
from tessera.dataprep.tokenizer import load_tokenizer, sidecar_path, tokenizer_from_bytes
from tessera.trainer.config import ClipConfig
from tessera.trainer.openclip import is_openclip_checkpoint, load_openclip
from tessera.trainer.similarity import SimilarityMethods

PAD_ID = 0  # tessera.dataprep.tokenizer's pad id; encode() never produces it

# --------------------------------------------------------------------------------------------
# Image tower


class ResBlock(nn.Module):
    """conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm, plus identity."""

    def __init__(self, width: int):
        super().__init__()
        groups = math.gcd(8, width)
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm1 = nn.GroupNorm(groups, width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = nn.GroupNorm(groups, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.norm1(self.conv1(x)))
        return F.gelu(x + self.norm2(self.conv2(h)))


class ImageTower(nn.Module):
    """Stride-2 stem, then (resblock, stride-2 conv) stages down to 4x4, flatten, project."""

    FINAL = 4

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        w = cfg.image_width
        self.image_size = cfg.image_size
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False), nn.GroupNorm(math.gcd(8, w), w), nn.GELU())
        side = cfg.image_size // 2
        stages = []
        width = w
        while side > self.FINAL:
            nxt = min(width * 2, 4 * w)
            stages.append(
                nn.Sequential(
                    ResBlock(width),
                    nn.Conv2d(width, nxt, 3, stride=2, padding=1, bias=False),
                    nn.GroupNorm(math.gcd(8, nxt), nxt),
                    nn.GELU(),
                )
            )
            width, side = nxt, side // 2
        self.stages = nn.Sequential(*stages)
        self.final = ResBlock(width)
        self.proj = nn.Linear(width * side * side, cfg.embed_dim)
        self.out_width = width * side * side

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # (B, 3, S, S) in [0, 1] -> (B, C * 4 * 4), before the projection
        x = (x - 0.5) / 0.25
        return self.final(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(x))


# --------------------------------------------------------------------------------------------
# Text tower


class Block(nn.Module):
    """Pre-LN transformer block with padding-masked bidirectional attention."""

    def __init__(self, d: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        mask = keep[:, None, None, :]  # (B, 1, 1, T): attend to real tokens only
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TextTower(nn.Module):
    """Token + position embeddings, transformer blocks, masked mean over real tokens, project."""

    def __init__(self, cfg: ClipConfig, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.text_len = cfg.text_len
        self.tok = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Parameter(torch.randn(cfg.text_len, cfg.d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads) for _ in range(cfg.n_layers))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.embed_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dim() != 2 or ids.shape[1] != self.text_len:
            raise InputError(f"clip text: expected ids of shape (B, {self.text_len}), got {tuple(ids.shape)}")
        keep = ids != PAD_ID
        keep[:, 0] = True  # an empty caption still attends to (and pools) its first slot
        x = self.tok(ids) + self.pos
        for blk in self.blocks:
            x = blk(x, keep)
        x = self.ln(x)
        w = keep.unsqueeze(-1).to(x.dtype)
        return self.proj((x * w).sum(1) / w.sum(1))


class CLIP(nn.Module):
    def __init__(self, cfg: ClipConfig, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.image = ImageTower(cfg)
        self.text = TextTower(cfg, vocab_size)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

    def _check_images(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise InputError(f"clip images: expected (B, 3, H, W) floats in [0, 1], got shape {tuple(x.shape)}")
        s = self.cfg.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x.float(), size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return x

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> unit-norm (B, E)."""
        return F.normalize(self.image(self._check_images(x)).float(), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, text_len) ids -> unit-norm (B, E)."""
        return F.normalize(self.text(ids).float(), dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Symmetric InfoNCE loss of a batch of matching pairs."""
        img, txt = self.encode_image(images), self.encode_text(ids)
        logits = self.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.t()  # (B, B)
        target = torch.arange(len(img), device=img.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def pad_ids(batch: Sequence[Sequence[int]], text_len: int) -> torch.Tensor:
    """Cut to text_len and right-pad with PAD_ID: (B, text_len) long."""
    out = torch.full((len(batch), text_len), PAD_ID, dtype=torch.long)
    for i, ids in enumerate(batch):
        ids = list(ids)[:text_len]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


# --------------------------------------------------------------------------------------------
# Checkpoints and the scorer


def checkpoint_state(model: CLIP, tokenizer_path: str | Path) -> dict[str, Any]:
    """The self-contained part of a "clip" checkpoint: weights, config, vocabulary and tokenizer bytes."""

    tp = Path(tokenizer_path)
    return {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": dataclasses.asdict(model.cfg),
        "vocab_size": model.text.vocab_size,
        "tokenizer_bytes": torch.frombuffer(bytearray(tp.read_bytes()), dtype=torch.uint8),
        "tokenizer_meta": json.loads(sidecar_path(tp).read_text()),
        "tokenizer_name": tp.name,
    }


class ClipScorer(SimilarityMethods):
    """A trained CLIP with its tokenizer: embeddings and image-caption cosine similarities."""

    def __init__(self, model: CLIP, tokenizer: Any, device: str | torch.device = "cpu"):
        super().__init__(model, tokenizer, device)

    def as_batch(self, images: Any) -> torch.Tensor:
        """A float (B, 3, H, W) batch in [0, 1] from a tensor (uint8 or float), or a list of PIL images / HxWx3 uint8 arrays
        (center-cropped and resized to the model's side; the crawler's similarity filter passes PIL images)."""
        if isinstance(images, torch.Tensor):
            return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()

        s = self.cfg.image_size
        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im, dtype=np.uint8))
            im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (s, s):
                side = min(w, h)
                im = im.crop(((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side)).resize(
                    (s, s), Image.Resampling.BICUBIC
                )
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        if not out:
            return torch.zeros(0, 3, s, s)
        return torch.stack(out).float() / 255.0

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return pad_ids(self.tokenizer.encode_batch(list(captions)), self.cfg.text_len)

    @torch.no_grad()
    def image_embeddings(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] (or see `as_batch`) -> unit-norm (B, E) on the CPU."""
        images = self.as_batch(images)
        out = [self.model.encode_image(images[i : i + batch_size].to(self.device).float()).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)

    @torch.no_grad()
    def image_features(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Pre-projection image features (B, C*16) on the CPU."""
        images = self.as_batch(images)
        out = []
        for i in range(0, len(images), batch_size):
            x = self.model._check_images(images[i : i + batch_size].to(self.device).float())
            out.append(self.model.image.features(x).float().cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.image.out_width)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        out = [
            self.model.encode_text(self.tokenize(captions[i : i + batch_size]).to(self.device)).cpu()
            for i in range(0, len(captions), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)


def _tokenizer_from_state(state: dict[str, Any], where: Path) -> Any:

    try:
        return tokenizer_from_bytes(
            state["tokenizer_bytes"].numpy().tobytes(), state["tokenizer_meta"], f"{where}:{state.get('tokenizer_name', 'tokenizer.model')}"
        )
    except InputError as e:
        raise CheckpointError(f"CLIP checkpoint '{where}' holds an unusable tokenizer: {e}") from None


def model_from_state(state: dict[str, Any], where: str | Path = "<state>") -> CLIP:

    try:
        cfg = from_dict(ClipConfig, state["config"], prefix="clip")
        model = CLIP(cfg, int(state["vocab_size"]))
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(
            f"CLIP checkpoint '{where}' does not match the model ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
        ) from None
    return model


def load_clip(path: str | Path, device: str | torch.device = "cpu") -> ClipScorer:
    """A ClipScorer from a `tessera train clip` run directory, one of its checkpoint files, or an
    export directory holding a CLIP (config.json "clip" entry, `clip.*` tensors, clip_tokenizer.model);
    or, for a local open_clip / OpenAI CLIP checkpoint file, a tessera.trainer.openclip.OpenClipScorer."""

    path = Path(path)
    if is_openclip_checkpoint(path):
        return load_openclip(path, device)  # type: ignore[return-value]
    if path.is_dir() and (path / "config.json").is_file() and not (path / "checkpoints").is_dir():
        return _load_from_export(path, device)
    state = load_checkpoint(path, "clip")
    model = model_from_state(state, path)
    return ClipScorer(model, _tokenizer_from_state(state, path), device)


def _load_from_export(path: Path, device: str | torch.device) -> ClipScorer:

    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError:
        raise CheckpointError(f"export '{path}': config.json is not valid JSON") from None
    cm = config.get("clip") if isinstance(config, dict) else None
    if not cm:
        raise CheckpointError(f"export '{path}' holds no CLIP (config.json has no 'clip' entry; export with --clip)")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"export '{path}' is missing model.safetensors")

    sd = {}
    with safe_open(str(weights), framework="pt") as f:
        for k in f.keys():
            if k.startswith("clip."):
                sd[k[len("clip.") :]] = f.get_tensor(k).float()
    model = model_from_state({"config": cm.get("config"), "vocab_size": cm.get("vocab_size"), "model": sd}, path)
    return ClipScorer(model, load_tokenizer(path / cm.get("tokenizer", "clip_tokenizer.model")), device)


def load_scorer(path: str | Path) -> ClipScorer:
    """The crawler's similarity-filter hook (tessera.dataprep.filters): `score(images, captions)` with PIL images."""
    return load_clip(path, "cuda" if torch.cuda.is_available() else "cpu")


__all__ = [
    "CLIP",
    "ClipScorer",
    "ImageTower",
    "TextTower",
    "load_clip",
    "load_scorer",
    "pad_ids",
    "checkpoint_state",
    "model_from_state",
    "PAD_ID",
]

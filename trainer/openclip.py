"""A local open_clip / OpenAI-CLIP checkpoint (standard ViT image tower) in plain torch.

open_clip itself is not importable here (it pulls in torchvision), and nothing is downloaded at
run time, so this module rebuilds the model from the checkpoint's own tensors:

    image (B, 3, S, S) -> conv1 patches + class token + positions -> ln_pre -> transformer
                       -> ln_post(class token) @ visual.proj                         -> (B, E)
    ids (B, L)         -> token_embedding + positional_embedding -> causal transformer
                       -> ln_final, features at the end_of_text position @ text_projection -> (B, E)

The parameter names are open_clip's (and OpenAI's), so `load_state_dict(strict=True)` checks
the checkpoint key for key. The architecture (widths, layers, patch size, image size, context
length, vocabulary size, embedding size) is read off the tensor shapes; heads = width / 64 as
in every released ViT CLIP. OpenAI's weights use QuickGELU, most open_clip LAION weights GELU:
pass `quick_gelu` to say which (it cannot be told from the weights).

The tokenizer is CLIP's byte-level BPE over the merges file `bpe_simple_vocab_16e6.txt.gz` that
open_clip ships; it is looked for beside the checkpoint unless given.
"""

from __future__ import annotations

import dataclasses
import gzip
import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np

try:  # optional: open_clip's exact pre-tokenizer pattern; `re` gives the same split on ASCII text
    import regex
except ImportError:  # pragma: no cover
    regex = None
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from tessera.core.errors import CheckpointError, InputError
from tessera.trainer.similarity import SimilarityMethods

MERGES_NAME = "bpe_simple_vocab_16e6.txt.gz"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# --------------------------------------------------------------------------------------------
# Tokenizer


@lru_cache()
def byte_to_char() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters:
    printable latin-1 bytes map to themselves, the rest to code points from 256 upwards."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pattern() -> Any:
    if regex is not None:
        return regex.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE
        )
    else:  # the same split with `re`: letters, single digits, runs of anything else
        return re.compile(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""", re.IGNORECASE)


class ClipTokenizer:
    """CLIP's tokenizer: lowercased, whitespace-collapsed text split into words, each word's UTF-8
    bytes merged by BPE (the last symbol carries "</w>"); ids framed by start/end of text."""

    def __init__(self, merges_path: str | Path, max_merges: int = 49152 - 256 - 2):
        merges_path = Path(merges_path)
        try:
            with gzip.open(merges_path, "rt", encoding="utf-8") as f:
                lines = f.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise InputError(f"BPE merges file '{merges_path}' is unreadable ({type(e).__name__})") from None
        merges = []
        for line in lines[1 : max_merges + 1]:  # the first line is a version header
            parts = tuple(line.split())
            if not parts:
                continue
            if len(parts) != 2:
                raise InputError(f"BPE merges file '{merges_path}': bad merge line {line[:60]!r}")
            merges.append(parts)
        chars = list(byte_to_char().values())
        vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = byte_to_char()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.vocab_size = len(vocab)
        self.pattern = _pattern()
        self.cache: dict[str, str] = {SOT: SOT, EOT: EOT}

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one word (already mapped through byte_to_char)."""
        if token in self.cache:
            return self.cache[token]
        word = [*token[:-1], token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(a, b) for a, b in zip(word, word[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        out = " ".join(word)
        if len(self.cache) < 100_000:
            self.cache[token] = out
        return out

    @staticmethod
    def clean(text: str) -> str:
        text = html.unescape(html.unescape(text)).strip()
        return re.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text`, without start/end tokens."""
        ids: list[int] = []
        for word in self.pattern.findall(self.clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[s] for s in self.bpe(word).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) in self.decoder)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> torch.Tensor:
        """(B, context_length) long ids: start, BPE ids, end, zero padding; a text too long is cut
        so that its last position still holds end_of_text."""
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot_id, *self.encode(t), self.eot_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_id
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


# --------------------------------------------------------------------------------------------
# Model


@dataclasses.dataclass
class OpenClipConfig:
    embed_dim: int
    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    text_len: int  # context length
    vocab_size: int
    text_width: int
    text_layers: int
    text_heads: int
    quick_gelu: bool = False


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); open_clip's parameter names."""

    def __init__(self, width: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, quick_gelu: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.resblocks:
            x = blk(x, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        w, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.quick_gelu)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.randn(w, cfg.embed_dim) * w**-0.5)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> pre-projection class-token features (B, width)."""
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x) @ self.proj


class OpenCLIP(nn.Module):
    def __init__(self, cfg: OpenClipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.randn(cfg.text_len, cfg.text_width) * 0.01)
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.randn(cfg.text_width, cfg.embed_dim) * cfg.text_width**-0.5)
        self.logit_scale = nn.Parameter(torch.tensor(2.6592600367) + 0.0)  # log(1 / 0.07)
        mask = torch.full((cfg.text_len, cfg.text_len), float("-inf")).triu(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, 3, S, S) -> unit-norm (B, E)."""
        return F.normalize(self.visual(x), dim=-1)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> unit-norm (B, E), read at each row's end_of_text (its largest id)."""
        if ids.dim() != 2 or ids.shape[1] != self.cfg.text_len:
            raise InputError(f"open_clip text: expected ids of shape (B, {self.cfg.text_len}), got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.positional_embedding
        x = self.ln_final(self.transformer(x, self.attn_mask.to(x.dtype)))
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        return F.normalize(x @ self.text_projection, dim=-1)


def config_from_state(sd: dict[str, torch.Tensor], quick_gelu: bool = False, head_width: int = 64) -> OpenClipConfig:
    """The architecture, read off the shapes as OpenAI's `build_model` does."""

    def n_layers(prefix: str) -> int:
        return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

    vw = sd["visual.conv1.weight"].shape[0]
    patch = sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    tw = sd["ln_final.weight"].shape[0]
    return OpenClipConfig(
        embed_dim=sd["text_projection"].shape[1],
        image_size=patch * grid,
        patch_size=patch,
        vision_width=vw,
        vision_layers=n_layers("visual.transformer.resblocks."),
        vision_heads=max(1, vw // head_width),
        text_len=sd["positional_embedding"].shape[0],
        vocab_size=sd["token_embedding.weight"].shape[0],
        text_width=tw,
        text_layers=n_layers("transformer.resblocks."),
        text_heads=max(1, tw // head_width),
        quick_gelu=quick_gelu,
    )


# --------------------------------------------------------------------------------------------
# Loading


def _unwrap(obj: Any) -> Any:
    """The state dict inside a checkpoint: the object itself or its "state_dict" entry, with a
    DataParallel/DDP "module." prefix removed."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def _is_openclip_state(obj: Any) -> bool:
    return isinstance(obj, dict) and "visual.conv1.weight" in obj and "token_embedding.weight" in obj


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an open_clip checkpoint file (torch.load with weights_only, or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"open_clip checkpoint '{path}' does not exist")
    try:
        if path.suffix == ".safetensors":
            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a checkpoint, pickled objects refused by weights_only
        raise CheckpointError(f"open_clip checkpoint '{path}' is truncated or corrupt ({type(e).__name__})") from None
    obj = _unwrap(obj)
    if not _is_openclip_state(obj):
        raise CheckpointError(f"'{path}' is not an open_clip ViT checkpoint (no 'visual.conv1.weight' / 'token_embedding.weight' tensors)")
    return obj


def is_openclip_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a file holding an open_clip / OpenAI CLIP state dict (cheap: memory-maps)."""
    path = Path(path)
    if not path.is_file():
        return False
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
            return "visual.conv1.weight" in keys or "module.visual.conv1.weight" in keys
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    return _is_openclip_state(_unwrap(obj))


def model_from_openclip_state(sd: dict[str, torch.Tensor], where: str | Path = "<state>", quick_gelu: bool = False) -> OpenCLIP:
    """An OpenCLIP with the checkpoint's weights, keys matched strictly. OpenAI's files also hold
    the ints input_resolution / context_length / vocab_size, which are dropped."""
    sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size", "attn_mask")}
    try:
        cfg = config_from_state(sd, quick_gelu)
        model = OpenCLIP(cfg)
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except (KeyError, RuntimeError, TypeError, AttributeError, IndexError, ValueError) as e:
        msg = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"open_clip checkpoint '{where}' does not match the ViT CLIP architecture ({type(e).__name__}: {msg})"
        ) from None
    return model.eval()


# --------------------------------------------------------------------------------------------
# Scorer


class OpenClipScorer(SimilarityMethods):
    """An open_clip CLIP with its tokenizer; the same methods as tessera.trainer.clip.ClipScorer."""

    def __init__(self, model: OpenCLIP, tokenizer: ClipTokenizer, device: str | torch.device = "cpu"):
        super().__init__(model, tokenizer, device)
        self.mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)

    def as_batch(self, images: Any) -> torch.Tensor:
        """A float (B, 3, S, S) batch in [0, 1] at the model's side S: the shortest side resized
        (bicubic) to S, then center-cropped. Takes a (B, 3, H, W) tensor (uint8, or float in [0, 1])
        or a list of PIL images / HxWx3 uint8 arrays."""
        s = self.cfg.image_size
        if isinstance(images, torch.Tensor):
            x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            if x.dim() != 4 or x.shape[1] != 3:
                raise InputError(f"open_clip images: expected (B, 3, H, W), got shape {tuple(x.shape)}")
            h, w = x.shape[-2:]
            if (h, w) != (s, s) and len(x):
                nh, nw = (s, max(s, round(w * s / h))) if h <= w else (max(s, round(h * s / w)), s)
                x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
                t, l = (nh - s) // 2, (nw - s) // 2
                x = x[:, :, t : t + s, l : l + s]
            return x

        out = []
        for im in images:
            if not isinstance(im, Image.Image):
                im = Image.fromarray(np.asarray(im, dtype=np.uint8))
            im = im.convert("RGB")
            w, h = im.size
            if (w, h) != (s, s):
                nw, nh = (max(s, round(w * s / h)), s) if h <= w else (s, max(s, round(h * s / w)))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                l, t = (nw - s) // 2, (nh - s) // 2
                im = im.crop((l, t, l + s, t + s))
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        if not out:
            return torch.zeros(0, 3, s, s)
        return torch.stack(out).float() / 255.0

    def _normalised(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.device).float() - self.mean.to(self.device)) / self.std.to(self.device)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(captions), self.cfg.text_len)

    @torch.no_grad()
    def image_embeddings(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Images (see `as_batch`) -> unit-norm (B, E) on the CPU."""
        images = self.as_batch(images)
        out = [
            self.model.encode_image(self._normalised(images[i : i + batch_size])).float().cpu() for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)

    @torch.no_grad()
    def image_features(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Pre-projection image features (B, vision_width) on the CPU."""
        images = self.as_batch(images)
        out = [
            self.model.visual.features(self._normalised(images[i : i + batch_size])).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.vision_width)

    @torch.no_grad()
    def text_embeddings(self, captions: Sequence[str], batch_size: int = 512) -> torch.Tensor:
        captions = list(captions)
        out = [
            self.model.encode_text(self.tokenize(captions[i : i + batch_size]).to(self.device)).float().cpu()
            for i in range(0, len(captions), batch_size)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim)


def find_merges(checkpoint: str | Path, merges: str | Path | None = None) -> Path:
    if merges is not None:
        p = Path(merges)
        if not p.is_file():
            raise InputError(f"BPE merges file '{p}' does not exist")
        return p
    p = Path(checkpoint).parent / MERGES_NAME
    if not p.is_file():
        raise InputError(
            f"open_clip checkpoint '{checkpoint}': no tokenizer merges file {MERGES_NAME} beside it (copy it from the open_clip package into {p.parent})"
        )
    return p


def load_openclip(
    path: str | Path, device: str | torch.device = "cpu", *, merges: str | Path | None = None, quick_gelu: bool = False
) -> OpenClipScorer:
    """An OpenClipScorer from a local open_clip / OpenAI CLIP checkpoint file; the BPE merges file
    is `merges` or bpe_simple_vocab_16e6.txt.gz beside the checkpoint."""
    path = Path(path)
    model = model_from_openclip_state(read_state(path), path, quick_gelu)
    tok = ClipTokenizer(find_merges(path, merges))
    if tok.vocab_size != model.cfg.vocab_size:
        raise CheckpointError(
            f"open_clip checkpoint '{path}' has a {model.cfg.vocab_size}-token vocabulary but the merges file gives {tok.vocab_size}"
        )
    return OpenClipScorer(model, tok, device)


__all__ = [
    "ClipTokenizer",
    "OpenCLIP",
    "OpenClipConfig",
    "OpenClipScorer",
    "config_from_state",
    "is_openclip_checkpoint",
    "load_openclip",
    "model_from_openclip_state",
    "read_state",
    "MERGES_NAME",
]

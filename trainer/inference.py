"""Loading an export directory and generating images: model definitions + safetensors only.

No training code, no DeepSpeed, no pickle: this module imports the model definitions
(`tessera.trainer.transformer`, `tessera.trainer.dvae`, `tessera.trainer.clip`), the tokenizer loader and the sampler.

    pipe = load("exports/demo")
    images = pipe.generate(["a small red circle at the top left on a gray background"], n=4, sample_cfg=SampleConfig())
    # float[4, 3, H, W] in [0, 1]

With `sample_cfg.candidates > 1`, each prompt gets n * candidates samples and the n with the
highest score are kept, best first. `sample_cfg.rerank` picks the score: the export's CLIP (paper
section 2.5), the transformer's own log-likelihood of the candidate given the caption (computed while
sampling, at no extra cost), or the sum of the two, each standardised over the prompt's candidates
(`rerank_scores`). Without a CLIP in the export, "clip" keeps the first n samples and "clip+logp"
ranks by the log-likelihood alone.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from tessera.core import config as C
from tessera.core.config import from_dict
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import atomic_write_bytes
from tessera.core.root_config import TesseraConfig
from tessera.dataprep.imaging import save_image_grid
from tessera.dataprep.tokenizer import load_tokenizer
from tessera.trainer.clip import CLIP, ClipScorer
from tessera.trainer.config import ClipConfig, DVAEModelConfig, SampleConfig, TransformerModelConfig
from tessera.trainer.dvae import DVAE
from tessera.trainer.sample import sample_codes
from tessera.trainer.transformer import DALLE, pad_text

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer.model.json")


def _from_dict(cls: type, d: dict, prefix: str) -> Any:

    return from_dict(cls, d, prefix=prefix)


def _sub(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v.float() for k, v in tensors.items() if k.startswith(prefix)}


@dataclass
class Pipeline:
    """Transformer + dVAE decoder + tokenizer (+ CLIP scorer): prompts in, images out."""

    transformer: DALLE
    dvae: Any
    tokenizer: Any
    clip: Any | None
    config: dict
    device: torch.device

    @property
    def default_sample_config(self) -> SampleConfig:
        d = {k: v for k, v in (self.config.get("sample") or {}).items() if k in SampleConfig.__dataclass_fields__}
        return _from_dict(SampleConfig, d, "sample")

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """long[len(prompts), text_len]: BPE ids (no dropout), truncated, padded with the per-position tokens."""
        cfg = self.transformer.cfg
        rows = []
        for p in prompts:
            ids = [i for i in self.tokenizer.encode(p) if 0 <= i < cfg.text_vocab]
            rows.append(pad_text(ids, cfg.text_len, cfg.text_vocab))
        return torch.tensor(rows, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate_codes(
        self,
        prompts: Sequence[str],
        n: int,
        sample_cfg: SampleConfig | None = None,
        generator: torch.Generator | None = None,
        with_logp: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """long[len(prompts) * n, grid, grid]; prompt i's samples are rows i*n .. i*n + n - 1.

        With `with_logp`, also float[len(prompts) * n]: each sample's log-likelihood given its caption."""
        scfg = sample_cfg or self.default_sample_config
        text = self.encode_prompts(prompts).repeat_interleave(n, dim=0)
        step = max(1, scfg.batch_size)
        g = self.transformer.cfg.image_grid
        out = [
            sample_codes(self.transformer, text[i : i + step], scfg, generator, return_logp=with_logp) for i in range(0, len(text), step)
        ]
        if not with_logp:
            return torch.cat(out).view(-1, g, g)
        return torch.cat([c for c, _ in out]).view(-1, g, g), torch.cat([lp for _, lp in out])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, batch: int = 64) -> torch.Tensor:
        return torch.cat([self.dvae.decode_codes(codes[i : i + batch]).float().cpu() for i in range(0, len(codes), batch)])

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str], n: int = 1, sample_cfg: SampleConfig | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """float[len(prompts) * n, 3, H, W] in [0, 1]; reranked by CLIP when the export has one."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts or n < 1:
            raise InputError(f"generate: expected at least one prompt and n >= 1, got {len(prompts)} prompts, n={n}")
        scfg = sample_cfg or self.default_sample_config
        use_clip = self.clip is not None and scfg.rerank in ("clip", "clip+logp")
        use_logp = scfg.rerank in ("logp", "clip+logp")
        cands = max(1, scfg.candidates) if (use_clip or use_logp) else 1
        codes, logp = (
            self.generate_codes(prompts, n * cands, scfg, generator, with_logp=True)
            if use_logp
            else (self.generate_codes(prompts, n * cands, scfg, generator), None)
        )
        images = self.decode(codes)
        if cands == 1:
            return images
        kept = []
        for i, p in enumerate(prompts):
            rows = slice(i * n * cands, (i + 1) * n * cands)
            group = images[rows]
            clip = self.clip.score(group, [p] * len(group)) if use_clip else None
            scores = rerank_scores(clip, logp[rows] if logp is not None else None)
            kept.append(group[scores.argsort(descending=True)[:n]])
        return torch.cat(kept)


def _standardised(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (x - x.mean()) / x.std().clamp_min(1e-9) if x.numel() > 1 else x - x.mean()


def rerank_scores(clip: torch.Tensor | None, logp: torch.Tensor | None) -> torch.Tensor:
    """One prompt's candidate scores (higher is better) from CLIP scores and/or log-likelihoods.

    With both, each is standardised over the candidates (mean 0, std 1) and the two are added, so
    neither scale dominates: the CLIP judges the image against the caption, the log-likelihood how
    typical the code sequence is for the caption (bench/results/transformer.md, session 7)."""
    if clip is None and logp is None:
        raise ValueError("rerank_scores: expected CLIP scores, log-likelihoods or both")
    if clip is None or logp is None:
        return (clip if logp is None else logp).double()
    if clip.shape != logp.shape:
        raise ValueError(f"rerank_scores: {tuple(clip.shape)} CLIP scores but {tuple(logp.shape)} log-likelihoods")
    return _standardised(clip.cpu()) + _standardised(logp.cpu())


def _check_dir(path: Path) -> dict:
    if not path.is_dir():
        raise InputError(f"export '{path}' is not a directory (expected the output of 'tessera export')")
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            raise InputError(f"export '{path}' is missing {name}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"export '{path}': config.json is unreadable ({type(e).__name__})") from None
    for key in ("transformer", "dvae", "tokenizer"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"export '{path}': config.json has no '{key}' section")
    return config


def load(path: str | Path, device: str | torch.device = "cpu") -> Pipeline:
    """The inference pipeline of an export directory (see module docstring)."""

    path = Path(path)
    config = _check_dir(path)
    device = torch.device(device)
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"export '{path}': model.safetensors is truncated or corrupt ({type(e).__name__})") from None

    mcfg = _from_dict(TransformerModelConfig, config["transformer"], "transformer.model")
    transformer = DALLE(mcfg)
    try:
        transformer.load_state_dict(_sub(tensors, "transformer."))
    except RuntimeError as e:
        raise CheckpointError(f"export '{path}': transformer tensors do not match config.json ({str(e).splitlines()[0][:120]})") from None

    known = set(DVAEModelConfig.__dataclass_fields__)
    dcfg = _from_dict(DVAEModelConfig, {k: v for k, v in config["dvae"].items() if k in known}, "dvae.model")
    dvae = DVAE(dcfg)
    try:
        dvae.decoder.load_state_dict(_sub(tensors, "dvae_decoder."))
    except RuntimeError as e:
        raise CheckpointError(f"export '{path}': dVAE decoder tensors do not match config.json ({str(e).splitlines()[0][:120]})") from None
    dvae.encoder = None  # not exported: only decoding is needed here

    tokenizer = load_tokenizer(path / config["tokenizer"].get("file", "tokenizer.model"))

    clip = None
    if config.get("clip"):
        cm = config["clip"]
        tok_file = path / cm.get("tokenizer", "clip_tokenizer.model")
        if not tok_file.is_file():
            raise InputError(f"export '{path}' is missing {tok_file.name}")
        ccfg = _from_dict(ClipConfig, cm["config"], "clip")
        clip_model = CLIP(ccfg, int(cm["vocab_size"]))
        try:
            clip_model.load_state_dict(_sub(tensors, "clip."))
        except RuntimeError as e:
            raise CheckpointError(f"export '{path}': CLIP tensors do not match config.json ({str(e).splitlines()[0][:120]})") from None
        clip = ClipScorer(clip_model, load_tokenizer(tok_file), device)

    return Pipeline(transformer.to(device).eval(), dvae.to(device).eval(), tokenizer, clip, config, device)


__all__ = ["Pipeline", "load", "rerank_scores", "REQUIRED_FILES"]


def sample_config(pipe: Any, preset: str | Path | None = None, overrides: Sequence[str] = ()) -> SampleConfig:
    """Sampling settings: the export's [sample] (from its training run) < preset < overrides."""
    saved = pipe.config.get("sample") or {}
    base = {"sample": {k: v for k, v in saved.items() if k in SampleConfig.__dataclass_fields__}}
    return C.load(TesseraConfig, preset, overrides, base=base).sample


def write_samples(pipe: Any, prompts: Sequence[str], n: int, cfg: SampleConfig, output: str | Path, seed: int = 0) -> int:
    """`n` images per prompt as PNGs (`PPP_KK.png`), `grid.png` and `prompts.txt` in `output`; returns the image count."""
    if n < 1:
        raise InputError(f"images per prompt: expected >= 1, got {n}")
    torch.manual_seed(seed)
    images = pipe.generate(list(prompts), n, cfg, generator=torch.Generator().manual_seed(seed))
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        p, k = divmod(i, n)
        arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        atomic_write_bytes(out / f"{p:03d}_{k:02d}.png", buf.getvalue())
    save_image_grid(images, out / "grid.png", nrow=n)
    atomic_write_bytes(out / "prompts.txt", "\n".join(prompts).encode() + b"\n")
    return len(images)

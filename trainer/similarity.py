"""The scoring methods shared by the project's CLIP and open_clip models: score, similarity, rerank.

A scorer subclass supplies `image_embeddings(images)` and `text_embeddings(captions)` (unit vectors).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tessera.core.errors import InputError


class SimilarityMethods:
    """score / similarity / rerank from `image_embeddings` and `text_embeddings` (unit vectors);
    shared by ClipScorer and tessera.trainer.openclip.OpenClipScorer, which both hold a model (with `.cfg`), its
    tokenizer and a device."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.cfg = model.cfg

    @torch.no_grad()
    def score(self, images: Any, captions: Sequence[str]) -> torch.Tensor:
        """Cosine similarity of image i with caption i: (B,) in [-1, 1]. Images: see `as_batch`."""
        if len(images) != len(captions):
            raise InputError(f"{type(self).__name__}.score: {len(images)} images but {len(captions)} captions")
        return (self.image_embeddings(images) * self.text_embeddings(list(captions))).sum(-1)

    @torch.no_grad()
    def similarity(self, images: Any, captions: Sequence[str]) -> torch.Tensor:
        """Every image against every caption: (n_images, n_captions) cosine similarities."""
        return self.image_embeddings(images) @ self.text_embeddings(list(captions)).t()

    @torch.no_grad()
    def rerank(self, images: Any, caption: str, top: int = 1) -> torch.Tensor:
        """Indices of the `top` images most similar to `caption`, best first."""
        s = self.score(images, [caption] * len(images))
        return s.argsort(descending=True)[:top]

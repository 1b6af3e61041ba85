"""Models and training: the dVAE, the sparse-attention transformer, the small CLIP, sampling and export."""

"""Tessera: train DALL-E style text-to-image models, from a url list to an exported sampler."""

__version__ = "0.1.0"

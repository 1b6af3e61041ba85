"""The root config: one section per pipeline stage. A preset in configs/ fills some or all of them."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera.cluster.config import DistConfig
from tessera.core.config import from_dict, load, param
from tessera.dataprep.config import CrawlConfig, EncodeConfig, SyntheticConfig, TokenizerConfig
from tessera.trainer.config import ClipConfig, DVAEConfig, SampleConfig, TransformerConfig


@dataclass
class TesseraConfig:
    """Every stage of the pipeline."""

    name: str = param("run", "A name for this configuration, written into run directories and exports.")
    seed: int = param(0, "Global random seed; each stage derives its own from it.")
    synthetic: SyntheticConfig = param(doc="The embedded synthetic dataset of the demo.", factory=SyntheticConfig)
    crawl: CrawlConfig = param(doc="Crawling, filtering and sharding of (url, caption) lists.", factory=CrawlConfig)
    tokenizer: TokenizerConfig = param(doc="The BPE caption tokenizer.", factory=TokenizerConfig)
    dvae: DVAEConfig = param(doc="The discrete VAE (image tokenizer): model and training.", factory=DVAEConfig)
    encode: EncodeConfig = param(doc="Encoding image shards to dVAE token shards.", factory=EncodeConfig)
    transformer: TransformerConfig = param(doc="The sparse-attention transformer: model and training.", factory=TransformerConfig)
    clip: ClipConfig = param(doc="The small CLIP used for reranking, filtering and evaluation.", factory=ClipConfig)
    sample: SampleConfig = param(doc="Sampling: temperature, top-k/p, guidance, candidates.", factory=SampleConfig)
    cluster: DistConfig = param(doc="Distributed training: DDP or DeepSpeed ZeRO stage, PowerSGD, backend.", factory=DistConfig)


def load_root(preset: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TesseraConfig:
    """The whole pipeline config: defaults < preset < overrides."""
    return load(TesseraConfig, preset, overrides)


def from_run_dict(data: dict[str, Any]) -> TesseraConfig:
    """Rebuild the root config from a run directory's config.toml contents."""
    return from_dict(TesseraConfig, data)

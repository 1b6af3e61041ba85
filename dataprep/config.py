"""Config dataclasses of the data-preparation stages (see tessera.config for loading rules)."""

from dataclasses import dataclass
from typing import Literal, Optional

from tessera.core.config import param
from tessera.core.errors import ConfigError


@dataclass
class SyntheticConfig:
    """The embedded demo dataset: coloured shapes at a few sizes and positions over varied backgrounds."""

    num_train: int = param(4000, "Images generated for training (before the held-out combinations are removed).")
    num_eval: int = param(200, "Held-out images for dVAE PSNR and evaluation.")
    source_size: int = param(128, "Side of the generated source images in pixels (the crawler resizes them).")
    holdout_fraction: float = param(0.1, "Fraction of attribute combinations held out of training for evaluation.")
    jpeg_quality: int = param(95, "JPEG quality of the served source images.")

    def validate(self) -> None:
        if self.num_train < 1 or self.num_eval < 1:
            raise ConfigError("config key 'synthetic.num_train'/'synthetic.num_eval': expected >= 1")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ConfigError(f"config key 'synthetic.holdout_fraction': expected in [0, 1), got {self.holdout_fraction}")


@dataclass
class FilterConfig:
    """Per-sample filters of the crawler; each rejection is counted by reason."""

    min_image_size: int = param(0, "Reject images whose shorter side is below this (pixels); 0 disables.")
    max_aspect_ratio: float = param(0.0, "Reject images whose long/short side ratio exceeds this; 0 disables.")
    min_caption_chars: int = param(1, "Reject captions shorter than this after stripping (1 rejects empty captions).")
    max_caption_chars: int = param(1000, "Reject captions longer than this; 0 disables.")
    max_pixels: int = param(89_478_485, "Decompression-bomb guard: reject images with more pixels, checked before decoding.")
    dedup_exact: bool = param(True, "Drop exact duplicates (same content hash) within the run and across parts.")
    dedup_near: bool = param(False, "Drop near duplicates by perceptual hash (Hamming distance <= near_dup_bits).")
    near_dup_bits: int = param(4, "Maximum Hamming distance of 64-bit perceptual hashes counted as a near duplicate.")
    similarity_threshold: float = param(0.0, "Minimum image-text similarity (LAION used 0.28 with CLIP ViT-B/32); 0 disables.")
    similarity_model: Optional[str] = param(None, "Scorer for the similarity filter: a Tessera CLIP export dir or an open_clip checkpoint.")
    reject_non_utf8_captions: bool = param(
        True, "Reject rows whose caption bytes are not valid UTF-8 (False: decode them with replacement characters)."
    )


@dataclass
class CrawlConfig:
    """Download, filter, resize and shard (url, caption) rows."""

    url_col: str = param("url", "Column holding the image URL.")
    caption_col: str = param("caption", "Column holding the caption.")
    keep_cols: list[str] = param(doc="Extra input columns copied into each sample's json.", factory=list)
    image_size: int = param(64, "Output side in pixels.")
    resize: Literal["center_crop", "keep_ratio", "border"] = param("center_crop", "Resize mode, as img2dataset's.")
    output_format: Literal["jpg", "webp"] = param("jpg", "Encoded output image format.")
    quality: int = param(95, "Output JPEG/WebP quality.")
    processes: int = param(2, "Worker processes.")
    threads: int = param(32, "Concurrent downloads per process.")
    shard_size: int = param(1000, "Input rows per shard (failures included, as img2dataset counts).")
    timeout: float = param(10.0, "Per-request timeout in seconds.")
    retries: int = param(2, "Retries for transient failures (connection errors, 429, 5xx), with exponential backoff.")
    max_bytes: int = param(20_000_000, "Largest accepted download body in bytes.")
    max_redirects: int = param(5, "Largest number of redirects followed.")
    allowed_schemes: list[str] = param(doc="URL schemes that may be fetched.", factory=lambda: ["http", "https"])
    user_agent: str = param("Tessera/0.1 (+https://github.com/tessera-ml/tessera)", "User-Agent header sent with every request.")
    respect_robots_header: bool = param(True, "Skip images whose X-Robots-Tag says noai/noimageai, as img2dataset does.")
    retry_backoff: float = param(0.5, "First retry delay in seconds; it doubles with every further retry.")
    s3_endpoint_url: Optional[str] = param(None, "S3 endpoint for s3:// outputs (None: boto3's own settings, e.g. AWS_ENDPOINT_URL_S3).")
    filters: FilterConfig = param(doc="Filters, each counted by reason.", factory=FilterConfig)

    def validate(self) -> None:
        for key in ("image_size", "processes", "threads", "shard_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'crawl.{key}': expected >= 1, got {getattr(self, key)}")


@dataclass
class TokenizerConfig:
    """The BPE caption tokenizer (paper: 16384 tokens, lower-cased captions)."""

    kind: Literal["sentencepiece", "youtokentome"] = param("youtokentome", "BPE implementation.")
    vocab_size: int = param(16384, "Vocabulary size, special tokens included.")
    lowercase: bool = param(True, "Lower-case captions before training and encoding (the paper does).")
    dropout: float = param(0.0, "BPE-dropout probability used when encoding for training (0 disables).")
    deterministic: bool = param(
        True,
        "youtokentome: learn the merges with Tessera's trainer (the same captions give the same model); false uses "
        "youtokentome's multi-threaded C++ trainer, faster on large corpora, whose ties fall differently run to run.",
    )

    def validate(self) -> None:
        if self.vocab_size < 8:
            raise ConfigError(f"config key 'tokenizer.vocab_size': expected >= 8, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"config key 'tokenizer.dropout': expected in [0, 1), got {self.dropout}")


@dataclass
class EncodeConfig:
    """Encoding image shards to token shards with a trained dVAE."""

    batch_size: int = param(64, "Images per encoder batch.")
    shard_size: int = param(10000, "Samples per output token shard.")
    workers: int = param(1, "Data-loading workers.")

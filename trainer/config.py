"""Config dataclasses of the training stages (see tessera.config for loading rules).

Paper references: Ramesh et al. 2021, "Zero-Shot Text-to-Image Generation" (DALL-E), App. A (dVAE)
and App. B (transformer).
"""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from tessera.core.config import param
from tessera.core.errors import ConfigError

Precision = Literal["auto", "fast", "fp32", "bf16", "fp16"]


@dataclass
class LoopConfig:
    """What the one training loop (tessera.trainer.fit) reads: the same keys in dvae.train, transformer.train and clip.

    Each stage declares its own defaults with `@loop_defaults(...)`; the keys and their documentation live here only.
    """

    KEY_PREFIX: ClassVar[str] = "loop"

    steps: int = param(1000, "Optimizer updates.")
    batch_size: int = param(64, "Global batch size (split across ranks).")
    lr: float = param(1e-3, "Peak learning rate.")
    lr_min: float = param(0.0, "Final learning rate of the cosine decay.")
    warmup_steps: int = param(0, "Linear warm-up updates (0: none).")
    weight_decay: float = param(0.0, "AdamW weight decay (decoupled; the stage chooses which parameters decay).")
    beta1: float = param(0.9, "AdamW beta1.")
    beta2: float = param(0.999, "AdamW beta2.")
    eps: float = param(1e-8, "AdamW epsilon.")
    grad_clip: float = param(0.0, "Gradient-norm clipping threshold; 0 disables.")
    ema_decay: float = param(0.0, "Parameter EMA decay (0: no EMA); the EMA weights are evaluated, sampled and exported.")
    precision: Precision = param(
        "auto",
        "auto: bf16 autocast on GPU, fp32 on CPU; fast: bf16 wherever the device has native bf16 matrix instructions "
        "(GPUs; CPUs with AVX512-BF16 or AMX), else fp32 (on AVX2-only CPUs bf16 is ~18x slower); fp32 / bf16 as named; "
        "fp16: autocast with a dynamic loss scale (torch.amp.GradScaler; steps with inf/nan gradients are skipped).",
    )
    grad_scaling: Literal["global", "per_resblock"] = param(
        "global",
        "The fp16 gradient scale: global, one dynamic loss scale (torch.amp.GradScaler, fp16 only); per_resblock, one "
        "scale per resblock with the paper's rules (App. D, tessera.trainer.grad_scale: M*2^13 at the start, x2^(1/1000) "
        "per applied update, /sqrt(2) on an overflow, the update skipped on every rank), active in fp16 and also in fp32 "
        "(where it changes only rounding; not in bf16). per_resblock: transformer only; plain, DDP and sharded engines.",
    )
    log_every: int = param(50, "Updates between metric lines (metrics.jsonl, TensorBoard, progress bar).")
    eval_every: int = param(500, "Updates between evaluations (0: only the final one).")
    sample_every: int = param(500, "Updates between sample grids (0: none); a last grid at the end of the run.")
    ckpt_every: int = param(1000, "Updates between checkpoints (0: only the final one).")
    time_budget_s: float = param(
        0.0, "Stop after this many seconds of training, summed over resumed runs (0: no limit); the step count still bounds it."
    )
    time_budget_mode: Literal["horizon", "safety"] = param(
        "horizon",
        "What time_budget_s means: horizon, the budget ends the run and the cosine horizon is fitted to the updates that fit "
        "in it (a time-bound run: its update count depends on the machine); safety, the step count bounds the run and the "
        "budget is only a safety stop, reported as a failure (summary 'failure') when it fires.",
    )
    threads: int = param(
        0, "Intra-op CPU threads during training (0: torch's default); 1 avoids OpenMP stalls when other jobs share the cores."
    )

    def validate(self) -> None:
        p = self.KEY_PREFIX
        for key in ("steps", "warmup_steps", "eval_every", "sample_every", "ckpt_every", "threads"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{p}.{key}': expected >= 0, got {getattr(self, key)}")
        for key in ("batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{p}.{key}': expected >= 1, got {getattr(self, key)}")
        for key in ("grad_clip", "time_budget_s", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key '{p}.{key}': expected >= 0, got {getattr(self, key)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"config key '{p}.ema_decay': expected in [0, 1), got {self.ema_decay}")


def loop_defaults(prefix: str, **defaults):
    """Class decorator: a dataclass subclass of LoopConfig whose loop keys take these defaults (same docs and types)."""

    def wrap(cls):
        own = dict(cls.__dict__.get("__annotations__", {}))
        for name, value in defaults.items():
            f = LoopConfig.__dataclass_fields__[name]
            own[name] = f.type
            setattr(cls, name, dataclasses.field(default=value, metadata=f.metadata))
        cls.__annotations__ = own
        cls.KEY_PREFIX = prefix
        return dataclass(cls)

    return wrap


@dataclass
class DVAEModelConfig:
    """Architecture of the dVAE (paper App. A.1; widths are multiples of n_hid as in the released model)."""

    image_size: int = param(256, "Input side in pixels.")
    channels: int = param(3, "Input channels.")
    n_hid: int = param(256, "Width of the first group; group g has width n_hid * 2**g (capped at 8x).")
    n_groups: int = param(4, "Groups of resblocks; each group but the last is followed by 2x2 pooling.")
    n_blk_per_group: int = param(2, "Bottleneck resblocks per group.")
    vocab_size: int = param(8192, "Codebook size (image-token vocabulary).")
    n_init: int = param(128, "Width of the decoder's first 1x1 conv from the vocabulary (128 in the released decoder).")

    def validate(self) -> None:
        if self.n_groups < 1:
            raise ConfigError(f"config key 'dvae.model.n_groups': expected >= 1, got {self.n_groups}")
        down = 2 ** (self.n_groups - 1)
        if self.image_size < down or self.image_size % down:
            raise ConfigError(
                f"config key 'dvae.model.image_size': expected a multiple of {down} for {self.n_groups} groups, got {self.image_size}"
            )
        for key in ("n_hid", "n_groups", "n_blk_per_group", "vocab_size", "n_init"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'dvae.model.{key}': expected >= 1, got {getattr(self, key)}")
        if self.n_hid % 4:
            raise ConfigError(f"config key 'dvae.model.n_hid': expected a multiple of 4 (bottleneck width is out/4), got {self.n_hid}")

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** (self.n_groups - 1)


@loop_defaults(
    "dvae.train",
    steps=3_000_000,
    batch_size=512,
    lr=1e-4,
    lr_min=1.25e-6,
    weight_decay=1e-4,
    beta2=0.999,
    ema_decay=0.999,
    log_every=50,
    eval_every=500,
    sample_every=500,
    ckpt_every=1000,
)
class DVAETrainConfig(LoopConfig):
    """Optimisation of the dVAE (paper App. A.2: schedules and optimiser); the loop keys are LoopConfig's."""

    lr_decay_steps: int = param(1_200_000, "Updates over which the learning rate decays (cosine).")
    kl_weight: float = param(6.6, "Final weight (beta) of the KL term to the uniform prior.")
    kl_warmup_steps: int = param(5000, "Updates over which the KL weight rises 0 -> kl_weight (cosine).")
    temp_start: float = param(1.0, "Initial gumbel-softmax temperature.")
    temp_end: float = param(1.0 / 16, "Final gumbel-softmax temperature.")
    temp_anneal_steps: int = param(150_000, "Updates over which the temperature anneals (cosine).")
    logit_laplace_eps: float = param(0.1, "epsilon of the pixel map phi(x) = (1 - 2 eps) x + eps.")
    diversity_weight: float = param(
        0.0, "Weight of log V - H(batch-mean code distribution), against codebook collapse in short runs; 0 = the paper's objective."
    )
    mse_weight: float = param(
        0.0,
        "Weight of the mean squared error of the relaxed reconstruction (pixels in [0, 1]) added to the per-dimension loss; 0 = the paper's objective. PSNR is a squared-error metric and the logit-Laplace term alone fits edges slowly (bench/results/dvae.md).",
    )
    codebook_init: Literal["none", "kmeans"] = param(
        "none",
        "none: the paper's random initialisation; kmeans: warm start from k-means codes of image patches (trainer/codebook_init.py).",
    )
    init_steps: int = param(
        0,
        "kmeans: updates of the warm start (decoder from k-means codes, encoder predicting them) before the gumbel-softmax objective; the temperature and KL schedules start after them.",
    )
    init_images: int = param(1000, "kmeans: training images whose patches are clustered.")
    init_iters: int = param(20, "kmeans: Lloyd iterations.")
    workers: int = param(0, "Data-loading workers per rank.")
    shuffle_buffer: int = param(1000, "Samples in the shuffle buffer.")
    train_data: str = param("", "Training shards: a folder, a brace pattern of tars, or s3://bucket/prefix.")
    eval_data: str = param("", "Held-out shards for evaluation (optional).")
    eval_samples: int = param(512, "Held-out images used per evaluation (the first ones of eval_data).")
    channels_last: bool = param(
        True,
        "Use the channels_last memory format for activations and weights (1.25x faster dVAE training on CPU, see bench/results/dvae.md).",
    )
    compile: bool = param(False, "torch.compile the model (GPU runs).")

    def validate(self) -> None:
        super().validate()
        for key in ("mse_weight", "init_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'dvae.train.{key}': expected >= 0, got {getattr(self, key)}")
        if self.codebook_init == "kmeans":
            if self.init_steps < 1:
                raise ConfigError(f"config key 'dvae.train.init_steps': expected >= 1 with codebook_init = 'kmeans', got {self.init_steps}")
            if self.init_images < 1 or self.init_iters < 1:
                raise ConfigError(
                    f"config key 'dvae.train.init_images': expected init_images >= 1 and init_iters >= 1, got {self.init_images} and {self.init_iters}"
                )


@dataclass
class DVAEConfig:
    """The discrete VAE: model and training."""

    model: DVAEModelConfig = param(doc="Architecture.", factory=DVAEModelConfig)
    train: DVAETrainConfig = param(doc="Optimisation.", factory=DVAETrainConfig)


@dataclass
class TransformerModelConfig:
    """The decoder-only transformer over [text tokens, image tokens] (paper section 2 and App. B)."""

    text_len: int = param(256, "Text positions; shorter captions are filled with a distinct padding token per position.")
    text_vocab: int = param(16384, "BPE vocabulary size (taken from the tokenizer when training from token shards).")
    image_grid: int = param(32, "Side of the image-token grid (image_grid**2 image tokens).")
    image_vocab: int = param(8192, "dVAE codebook size (taken from the dVAE when training from token shards).")
    d_model: int = param(3968, "Width of the residual stream.")
    n_layers: int = param(64, "Resblocks (attention + MLP).")
    n_heads: int = param(62, "Attention heads.")
    mlp_ratio: float = param(4.0, "MLP hidden width over d_model.")
    dropout: float = param(0.0, "Dropout on residual branches.")
    attention: Literal["dalle", "dense"] = param(
        "dalle", "dalle: the paper's row/column/convolutional layer pattern; dense: causal everywhere."
    )
    conv_kernel: int = param(11, "Side k of the causal k x k neighbourhood of the convolutional mask.")

    def validate(self) -> None:
        if self.n_heads < 1:
            raise ConfigError(f"config key 'transformer.model.n_heads': expected >= 1, got {self.n_heads}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config key 'transformer.model.d_model': expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        if self.conv_kernel % 2 == 0:
            raise ConfigError(f"config key 'transformer.model.conv_kernel': expected odd, got {self.conv_kernel}")


@loop_defaults(
    "transformer.train",
    steps=430_000,
    batch_size=1024,
    lr=4.5e-4,
    lr_min=0.0,
    warmup_steps=5000,
    weight_decay=4.5e-2,
    beta2=0.96,
    grad_clip=4.0,
    eval_every=1000,
    sample_every=1000,
    ckpt_every=1000,
)
class TransformerTrainConfig(LoopConfig):
    """Optimisation of the transformer (paper App. B.2); the loop keys are LoopConfig's.

    With time_budget_s > 0 the cosine horizon is fitted to the budget (tessera.trainer.fit)."""

    decay: Literal["cosine", "plateau"] = param("cosine", "cosine to lr_min after warm-up, or plateau (halve on no improvement).")
    caption_dropout: float = param(0.0, "Probability of an empty caption (enables classifier-free guidance).")
    image_loss_weight: float = param(7.0, "Loss = (text CE + w * image CE) / (1 + w), each averaged over its tokens.")
    bpe_dropout: float = param(0.1, "BPE-dropout probability for training captions (paper: 0.1).")
    workers: int = param(0, "Data-loading workers per rank.")
    shuffle_buffer: int = param(1000, "Samples in the shuffle buffer.")
    train_data: str = param("", "Token shards from `tessera prep encode`.")
    eval_data: str = param("", "Held-out token shards (optional).")


@dataclass
class TransformerConfig:
    """The transformer: model and training."""

    model: TransformerModelConfig = param(doc="Architecture.", factory=TransformerModelConfig)
    train: TransformerTrainConfig = param(doc="Optimisation.", factory=TransformerTrainConfig)


@loop_defaults(
    "clip",
    steps=2000,
    batch_size=128,
    lr=5e-4,
    lr_min=1e-5,
    warmup_steps=100,
    weight_decay=0.1,
    beta2=0.98,
    eps=1e-6,
    grad_clip=1.0,
    log_every=50,
    eval_every=500,
    sample_every=0,
    ckpt_every=1000,
)
class ClipConfig(LoopConfig):
    """A small contrastive image-text model for reranking, the crawl similarity filter and evaluation; the loop keys are LoopConfig's."""

    d_model: int = param(256, "Width of the text transformer.")
    n_layers: int = param(4, "Text transformer layers.")
    n_heads: int = param(4, "Text attention heads.")
    image_width: int = param(64, "Width of the first image conv stage (each further stage doubles it, up to 4x).")
    image_size: int = param(64, "Side the image tower sees; other sizes are resized to it (a power of two >= 8).")
    embed_dim: int = param(128, "Width of the shared image-text embedding (both projections).")
    text_len: int = param(32, "Caption tokens (longer captions are cut).")
    temperature_init: float = param(0.07, "Initial softmax temperature of the contrastive loss (learned, as log 1/T).")
    bpe_dropout: float = param(0.0, "BPE-dropout probability for training captions.")
    max_train_samples: int = param(100_000, "Training pairs held in memory (the first ones of the shards).")
    eval_samples: int = param(1000, "Held-out pairs used for retrieval accuracy.")
    checkpoint: Optional[str] = param(None, "Use this local open_clip checkpoint instead of training one.")

    MODEL_KEYS: ClassVar[tuple[str, ...]] = ("d_model", "n_layers", "n_heads", "image_width", "image_size", "embed_dim", "text_len")

    def validate(self) -> None:
        super().validate()
        if self.n_heads < 1:
            raise ConfigError(f"config key 'clip.n_heads': expected >= 1, got {self.n_heads}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"config key 'clip.d_model': expected a multiple of n_heads={self.n_heads}, got {self.d_model}")
        if self.image_size < 8 or self.image_size & (self.image_size - 1):
            raise ConfigError(f"config key 'clip.image_size': expected a power of two >= 8, got {self.image_size}")
        for key in ("d_model", "n_layers", "image_width", "embed_dim", "text_len", "steps", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'clip.{key}': expected >= 1, got {getattr(self, key)}")
        if not 0.0 <= self.bpe_dropout < 1.0:
            raise ConfigError(f"config key 'clip.bpe_dropout': expected in [0, 1), got {self.bpe_dropout}")


@dataclass
class SampleConfig:
    """Sampling from an exported model."""

    temperature: float = param(1.0, "Softmax temperature.")
    top_k: int = param(0, "Keep the k most likely tokens (0 disables).")
    top_p: float = param(1.0, "Nucleus sampling mass (1 disables).")
    guidance_scale: float = param(1.0, "Classifier-free guidance scale (1 disables; needs caption dropout in training).")
    candidates: int = param(1, "Candidates per kept image; the best by the `rerank` score are kept.")
    rerank: Literal["clip", "logp", "clip+logp"] = param(
        "clip",
        "How candidates are ranked: clip (the export's CLIP score, paper sec. 2.5; no reranking without a CLIP), "
        "logp (the transformer's log-likelihood of the candidate given the caption), or clip+logp (the sum of the "
        "two, each standardised over the prompt's candidates; logp alone without a CLIP).",
    )
    batch_size: int = param(16, "Sequences decoded together.")
    use_kv_cache: bool = param(True, "Incremental decoding with a KV cache.")

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"config key 'sample.temperature': expected > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config key 'sample.top_p': expected in (0, 1], got {self.top_p}")

"""The discrete VAE of DALL-E (Ramesh et al. 2021, App. A): an image tokenizer.

Encoder: 7x7 conv, `n_groups` groups of bottleneck resblocks (2x2 max-pool after every group but
the last), relu + 1x1 conv to `vocab_size` logits per grid position. Decoder: 1x1 conv from the
(relaxed) one-hot codes to `n_init` channels, mirrored groups with nearest 2x upsampling, 1x1 conv
to 6 channels (mu and log b of a logit-Laplace distribution per RGB channel, App. A.3).

Module and parameter names follow the released OpenAI dVAE (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.b`, `blocks.output.conv.w`, ...), so its weights load
without renaming (scripts/convert_openai_dvae.py).

Pixels: the encoder sees phi(x) = (1 - 2 eps) x + eps (App. A.3, eps = 0.1); reconstructions are
phi^-1(sigmoid(mu)) clamped to [0, 1].
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from tessera.core.config import from_dict
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import load_checkpoint
from tessera.trainer.config import DVAEModelConfig

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """phi(x) = (1 - 2 eps) x + eps: [0, 1] -> [eps, 1 - eps] (App. A.3)."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """phi^-1, clamped to [0, 1]."""
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def group_widths(cfg: DVAEModelConfig) -> list[int]:
    """Width of each group: n_hid * 2**g, capped at 8 * n_hid (the released model has 1, 2, 4, 8)."""
    return [cfg.n_hid * min(2**g, 8) for g in range(cfg.n_groups)]


class Conv2d(nn.Module):
    """A 'same'-padded conv whose parameters are called `w` and `b`, as in the released dVAE."""

    def __init__(self, n_in: int, n_out: int, kw: int):
        super().__init__()
        self.kw = kw
        # init as the released model: N(0, 1/fan_in), zero bias
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / math.sqrt(n_in * kw * kw))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class ResBlock(nn.Module):
    """Bottleneck resblock: id_path(x) + post_gain * res_path(x), hidden width n_out/4.

    Encoder path: relu-3x3, relu-3x3, relu-3x3, relu-1x1; decoder path: relu-1x1, relu-3x3 x3.
    post_gain = 1 / n_layers**2 keeps the residual stream's scale at init (App. A.1).
    """

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers: list[tuple[str, nn.Module]] = []
        for i, k in enumerate(kernels):
            layers.append((f"relu_{i + 1}", nn.ReLU()))
            layers.append((f"conv_{i + 1}", Conv2d(widths[i], widths[i + 1], k)))
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


ENCODER_KERNELS = (3, 3, 3, 1)
DECODER_KERNELS = (1, 3, 3, 3)


class Encoder(nn.Module):
    """phi(x): float[B, C, H, W] -> logits float[B, vocab, H/2**(n_groups-1), W/2**(n_groups-1)]."""

    def __init__(self, cfg: DVAEModelConfig):
        super().__init__()
        self.cfg = cfg
        widths = group_widths(cfg)
        n_layers = cfg.n_groups * cfg.n_blk_per_group
        mods: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.channels, widths[0], 7))]
        n_in = widths[0]
        for g, w in enumerate(widths):
            blocks: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                blocks.append((f"block_{i + 1}", ResBlock(n_in, w, n_layers, ENCODER_KERNELS)))
                n_in = w
            if g < cfg.n_groups - 1:
                blocks.append(("pool", nn.MaxPool2d(kernel_size=2)))
            mods.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        mods.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], cfg.vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(mods))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if x.dim() != 4 or x.shape[1] != c.channels or x.shape[2] != x.shape[3] or x.shape[2] % 2 ** (c.n_groups - 1):
            raise InputError(
                f"dVAE encoder: expected images (B, {c.channels}, S, S) with S a multiple of {2 ** (c.n_groups - 1)}, got {tuple(x.shape)}"
            )
        return self.blocks(x)


class Decoder(nn.Module):
    """(relaxed) one-hot codes float[B, vocab, G, G] -> stats float[B, 2*C, G*2**(n_groups-1), ...]."""

    def __init__(self, cfg: DVAEModelConfig):
        super().__init__()
        self.cfg = cfg
        widths = list(reversed(group_widths(cfg)))
        n_layers = cfg.n_groups * cfg.n_blk_per_group
        mods: list[tuple[str, nn.Module]] = [("input", Conv2d(cfg.vocab_size, cfg.n_init, 1))]
        n_in = cfg.n_init
        for g, w in enumerate(widths):
            blocks: list[tuple[str, nn.Module]] = []
            for i in range(cfg.n_blk_per_group):
                blocks.append((f"block_{i + 1}", ResBlock(n_in, w, n_layers, DECODER_KERNELS)))
                n_in = w
            if g < cfg.n_groups - 1:
                blocks.append(("upsample", nn.Upsample(scale_factor=2, mode="nearest")))
            mods.append((f"group_{g + 1}", nn.Sequential(OrderedDict(blocks))))
        mods.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(widths[-1], 2 * cfg.channels, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(mods))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 4 or z.shape[1] != self.cfg.vocab_size:
            raise InputError(f"dVAE decoder: expected codes (B, {self.cfg.vocab_size}, G, G), got {tuple(z.shape)}")
        return self.blocks(z)


def logit_laplace_nll(stats: torch.Tensor, x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Negative log-likelihood of pixels x in [0, 1] under the logit-Laplace distribution (App. A.3).

    y = phi(x) in (eps, 1 - eps); p(y | mu, b) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)).
    stats: (B, 2C, H, W) = (mu, log b). Returns the per-image sum, float[B].
    """
    c = x.shape[1]
    stats = stats.float()
    mu, log_b = stats[:, :c], stats[:, c:]
    y = map_pixels(x.float(), eps)
    logit_y = torch.log(y) - torch.log1p(-y)
    nll = math.log(2.0) + log_b + torch.log(y) + torch.log1p(-y) + (logit_y - mu).abs() * torch.exp(-log_b)
    return nll.flatten(1).sum(1)


def code_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log q(z | x) of encoder logits (B, V, G, G), with the codes last: float (B, G, G, V).

    Every softmax over the codes here runs along a (B, G, G, V) view of the logits, which is contiguous for the
    dVAE's channels_last layout: the reductions then read memory in order and nothing is copied between layouts
    (the relaxed-code terms of a demo update, 16 x 512 x 16 x 16, took ~2x longer along dim 1; bench/results/demo.md).
    """
    return F.log_softmax(logits.float().permute(0, 2, 3, 1), dim=-1)


def kl_to_uniform(logits: torch.Tensor, logq: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q(z|x) || uniform) summed over grid positions: float[B]. logits: (B, V, G, G); `logq`: their
    code_log_probs when the caller has them already."""
    logq = code_log_probs(logits) if logq is None else logq
    kl = (logq.exp() * (logq + math.log(logq.shape[-1]))).sum(-1)
    return kl.flatten(1).sum(1)


def gumbel_softmax(logits: torch.Tensor, temp: float, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """Relaxed one-hot samples over dim 1 (Jang et al. 2016; Maddison et al. 2016); `generator`: one for the batch,
    or a list of one per sample (each row's noise then does not depend on how a batch is split across ranks).

    The noise is drawn in (B, V, G, G) order; the softmax runs with the codes last (see code_log_probs), and the
    result is returned as (B, V, G, G) in that layout (channels_last strides)."""
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(logits.shape[1:], generator=g, device=logits.device, dtype=torch.float32) for g in generator])
    else:
        u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    g = u.permute(0, 2, 3, 1).clamp(1e-10, 1.0 - 1e-7).log_().neg_().log_().neg_()
    z = F.softmax((logits.float().permute(0, 2, 3, 1) + g) / temp, dim=-1)
    return z.to(logits.dtype).permute(0, 3, 1, 2)


class DVAE(nn.Module):
    """Encoder + decoder with the paper's helpers (CONTRACTS.md item 5)."""

    def __init__(self, cfg: DVAEModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def _check_images(self, x: torch.Tensor) -> None:
        s = self.cfg.image_size
        if x.dim() != 4 or x.shape[1:] != (self.cfg.channels, s, s):
            raise InputError(f"dVAE: expected images (B, {self.cfg.channels}, {s}, {s}) in [0, 1], got {tuple(x.shape)}")

    def forward(
        self,
        x: torch.Tensor,
        temp: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        codes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass: (encoder logits (B, V, G, G), decoder stats (B, 2C, H, W)).

        The decoder sees gumbel-softmax samples of the logits, or the one-hot `codes` long[B, G, G]
        when they are given (the k-means warm start, trainer/codebook_init.py).
        """
        self._check_images(x)
        logits = self.encoder(map_pixels(x))
        z = gumbel_softmax(logits, temp, generator) if codes is None else self.one_hot(codes, logits.dtype)
        z = z.contiguous(memory_format=torch.channels_last) if x.is_contiguous(memory_format=torch.channels_last) else z.contiguous()
        return logits, self.decoder(z)

    @torch.no_grad()
    def get_codes(self, x: torch.Tensor) -> torch.Tensor:
        """Images float[B, 3, H, W] in [0, 1] -> codes long[B, G, G] (argmax of the logits, no noise).

        The images go in as channels_last, the layout the demo trains in: the encoder's small-channel convolutions
        run ~1.7x faster in it on CPU (bench/results/demo.md, session 16)."""
        self._check_images(x)
        return self.encoder(map_pixels(x.float()).contiguous(memory_format=torch.channels_last)).argmax(1)

    def one_hot(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Codes long[B, G, G] -> one-hot float[B, V, G, G], the decoder's input."""
        return F.one_hot(codes.long(), self.cfg.vocab_size).permute(0, 3, 1, 2).to(dtype)

    def decode_stats(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.one_hot(codes, self.decoder.blocks.input.w.dtype))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes long[B, G, G] -> images float[B, 3, H, W] in [0, 1] (phi^-1(sigmoid(mu)))."""
        if codes.dim() != 3 or codes.shape[1] != codes.shape[2]:
            raise InputError(f"dVAE decode_codes: expected codes (B, G, G), got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.cfg.vocab_size):
            raise InputError(
                f"dVAE decode_codes: codes must lie in [0, {self.cfg.vocab_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        return stats_to_image(self.decode_stats(codes), self.cfg.channels)

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Hard reconstruction: decode_codes(get_codes(x))."""
        return self.decode_codes(self.get_codes(x))


def stats_to_image(stats: torch.Tensor, channels: int = 3) -> torch.Tensor:
    return unmap_pixels(torch.sigmoid(stats[:, :channels].float()))


# --------------------------------------------------------------------------------------------
# Loading (CONTRACTS.md item 5): a run dir, a checkpoint file, or an export dir.


def model_config_from_dict(d: dict) -> DVAEModelConfig:

    return from_dict(DVAEModelConfig, d, prefix="dvae.model")


def _load_export(path: Path) -> tuple[DVAE, DVAEModelConfig]:

    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"export '{path}': config.json is unreadable ({type(e).__name__})") from None
    d = meta.get("dvae", meta)
    d = d.get("model", d) if isinstance(d, dict) else d
    if not isinstance(d, dict):
        raise CheckpointError(f"export '{path}': config.json has no 'dvae' model section")
    known = {f for f in DVAEModelConfig.__dataclass_fields__}
    cfg = model_config_from_dict({k: v for k, v in d.items() if k in known})
    try:
        tensors = load_file(str(path / "model.safetensors"))
    except Exception as e:
        raise CheckpointError(f"export '{path}': model.safetensors is truncated or corrupt ({type(e).__name__})") from None
    model = DVAE(cfg)
    sd = {}
    for prefix, sub in (("dvae_encoder.", "encoder."), ("dvae_decoder.", "decoder."), ("dvae.", "")):
        sd.update({sub + k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
    if not any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"export '{path}': model.safetensors holds no dVAE tensors (dvae_decoder.*)")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any(m.startswith("decoder.") for m in missing):
        raise CheckpointError(f"export '{path}': dVAE tensors do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.has_encoder = not any(m.startswith("encoder.") for m in missing)
    return model.eval(), cfg


def load_dvae(path: str | Path, map_location: str = "cpu") -> tuple[DVAE, DVAEModelConfig]:
    """A trained dVAE with its EMA weights, in eval mode, from a run dir, a checkpoint or an export dir.

    Export dirs (config.json + model.safetensors) usually hold only the decoder (`dvae_decoder.*`);
    then `model.has_encoder` is False and the encoder weights are untrained.
    """

    path = Path(path)
    if path.is_dir() and (path / "model.safetensors").exists():
        return _load_export(path)
    if not path.exists():
        raise InputError(f"dVAE '{path}' does not exist (expected a run dir, a checkpoint or an export dir)")
    ck = load_checkpoint(path, "dvae", map_location=map_location)
    if "model_cfg" not in ck or ("ema" not in ck and "model" not in ck):
        raise CheckpointError(f"checkpoint '{path}' lacks 'model_cfg' or weights")
    cfg = model_config_from_dict(ck["model_cfg"])
    model = DVAE(cfg)
    weights = ck.get("ema") or ck["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint '{path}': weights do not match its model_cfg ({str(e).splitlines()[0][:120]})") from None
    model.has_encoder = True
    return model.eval(), cfg

"""What the capacity planner knows of a model: parameters, matrices, FLOPs and activations, from its config.

Everything here is computed from the config alone (no model is built), so the 12B transformer can
be sized on a laptop; tests/cluster/test_plan.py checks the parameter counts against the models'
own `num_parameters()` and the largest layer against DeepSpeed's `model_to_params`.

Transformer (trainer/transformer.py, DALLE): per resblock two LayerNorms, qkv [3d, d] + bias,
proj [d, d] + bias, fc [h, d] + bias, proj [d, h] + bias (h = int(d * mlp_ratio)); embeddings of
text (vocab + one padding token per position), text positions, image codes, image rows and columns;
a final LayerNorm and two bias-free heads. Attention FLOPs count only the (query, key) pairs that
each layer's mask allows (tessera.kernels.layouts: row / column / conv, or causal with
attention = "dense"): 4 * d FLOPs per pair in the forward pass (q.k and p.v).

Activations saved for the backward pass, per token and resblock, in elements of the activation
width (flash-style attention: q, k, v, the output and its log-sum-exp are kept, never the S x S
scores; this is what torch's SDPA on CPU and the block-sparse Triton kernel keep):
  LayerNorm 1 input and output (2d), q k v (3d), attention output (d) and its merged copy (d),
  LayerNorm 2 input and output (2d), MLP hidden before and after GELU (2h): 9d + 2h,
plus the log-sum-exp (n_heads fp32). With activation checkpointing each resblock keeps only its
input (d) and one resblock is recomputed at a time during the backward pass. The cross-entropy keeps
its fp32 log-softmax (the logits themselves are not kept); the peak comes at the start of the
backward pass, when the fp32 gradients of the log-softmax and of the logits exist beside all of that:
three logit-sized fp32 tensors, which dominate with a large vocabulary and a small model.

dVAE (trainer/dvae.py): every conv is listed with its input size; a conv keeps its input, so the
saved activations are the sum of the conv inputs, plus the encoder logits and the softmax / KL /
gumbel terms over the code grid and the logit-Laplace terms over the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tessera.kernels.layouts import layer_layouts
from tessera.trainer.config import DVAEModelConfig, TransformerModelConfig
from tessera.trainer.dvae import DECODER_KERNELS, ENCODER_KERNELS, group_widths


@dataclass(frozen=True)
class ModelShape:
    """The planner's view of one model (counts are elements or FLOPs for one training sample)."""

    name: str
    params: int
    largest_layer: int  # parameters of the largest single module (DeepSpeed's ZeRO-3 gather unit)
    block_params: int  # parameters of one resblock (the paper layout's all-gather unit)
    n_blocks: int
    matrices: tuple[tuple[int, int, int], ...]  # (rows, cols, how many): the 2-D weights PowerSGD may compress
    tokens_per_sample: int
    flops_fwd: float  # forward FLOPs of one sample
    attention_flops_fwd: float  # of which attention scores and weighted sums (unmasked pairs only)
    dense_attention_flops_fwd: float  # the same under plain causal attention, for comparison
    recompute_flops_fwd: float  # forward FLOPs that activation checkpointing runs again
    act_elems: float  # saved activations per sample, in activation-width elements
    act_fp32_elems: float  # saved activations per sample that are always fp32
    ckpt_act_elems: float  # with activation checkpointing
    ckpt_act_fp32_elems: float
    buffer_bytes: int = 0  # non-parameter module buffers (the attention masks)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def matrix_params(self) -> int:
        return sum(m * n * c for m, n, c in self.matrices)


def _block_params(d: int, h: int) -> int:
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (h * d + h) + (d * h + d)


def transformer_params(cfg: TransformerModelConfig) -> int:
    d, t, g = cfg.d_model, cfg.text_len, cfg.image_grid
    h = int(d * cfg.mlp_ratio)
    vt = cfg.text_vocab + t
    emb = vt * d + t * d + cfg.image_vocab * d + 2 * g * d
    heads = d * vt + d * cfg.image_vocab
    return emb + cfg.n_layers * _block_params(d, h) + 2 * d + heads


def attention_pairs(cfg: TransformerModelConfig) -> tuple[int, int]:
    """(allowed query-key pairs summed over the layers under the config's pattern, the same for causal attention)."""
    layouts = layer_layouts(cfg.n_layers, cfg.text_len, cfg.image_grid, cfg.conv_kernel, cfg.attention)
    by_kind: dict[tuple, int] = {}
    total = 0
    for lay in layouts:
        key = (lay.kind, lay.transposed)
        if key not in by_kind:
            by_kind[key] = int(lay.mask().sum())
        total += by_kind[key]
    s = cfg.text_len + cfg.image_grid**2
    return total, cfg.n_layers * s * (s + 1) // 2


def transformer_shape(cfg: TransformerModelConfig) -> ModelShape:
    d, t, g, L = cfg.d_model, cfg.text_len, cfg.image_grid, cfg.n_layers
    h = int(d * cfg.mlp_ratio)
    n_img = g * g
    s = t + n_img
    vt = cfg.text_vocab + t
    block = _block_params(d, h)
    pairs, dense_pairs = attention_pairs(cfg)
    matmul = 2 * s * L * (4 * d * d + 2 * d * h)
    attn = 4.0 * d * pairs
    head_flops = 2.0 * d * ((t - 1) * vt + n_img * cfg.image_vocab)
    logits = (t - 1) * vt + n_img * cfg.image_vocab
    per_layer = (9 * d + 2 * h) * s
    lse = L * cfg.n_heads * s
    tail = 2 * d * s  # ln_f input and output
    largest = max(vt * d, cfg.image_vocab * d, h * d + h, 3 * d * d + 3 * d)
    return ModelShape(
        name="transformer",
        params=transformer_params(cfg),
        largest_layer=largest,
        block_params=block,
        n_blocks=L,
        matrices=((3 * d, d, L), (d, d, L), (h, d, L), (d, h, L)),
        tokens_per_sample=s,
        flops_fwd=matmul + attn + head_flops,
        attention_flops_fwd=attn,
        dense_attention_flops_fwd=4.0 * d * dense_pairs,
        recompute_flops_fwd=matmul + attn,
        act_elems=L * per_layer + tail,
        act_fp32_elems=lse + 3 * logits,  # log-softmax, and the two logit-sized gradients of the backward's start
        ckpt_act_elems=L * d * s + per_layer + tail,
        ckpt_act_fp32_elems=cfg.n_heads * s + 3 * logits,
        buffer_bytes=2 * L * s * s,  # each resblock registers its bool mask and its raster-order mask
        notes=(f"{L} resblocks, S = {t} text + {n_img} image tokens",),
    )


def dvae_convs(cfg: DVAEModelConfig) -> list[tuple[int, int, int, int]]:
    """(c_in, c_out, kernel, side) of every conv of the encoder and the decoder, side = the spatial size it runs at."""
    widths = group_widths(cfg)
    n, side = cfg.image_size, cfg.image_size
    convs = [(cfg.channels, widths[0], 7, side)]
    n_in = widths[0]
    for gi, w in enumerate(widths):
        for _ in range(cfg.n_blk_per_group):
            convs += _resblock_convs(n_in, w, ENCODER_KERNELS, side)
            n_in = w
        if gi < cfg.n_groups - 1:
            side //= 2
    convs.append((widths[-1], cfg.vocab_size, 1, side))
    convs.append((cfg.vocab_size, cfg.n_init, 1, side))
    n_in = cfg.n_init
    for gi, w in enumerate(reversed(widths)):
        for _ in range(cfg.n_blk_per_group):
            convs += _resblock_convs(n_in, w, DECODER_KERNELS, side)
            n_in = w
        if gi < cfg.n_groups - 1:
            side *= 2
    convs.append((widths[0], 2 * cfg.channels, 1, side))
    assert side == n
    return convs


def _resblock_convs(n_in: int, n_out: int, kernels: tuple[int, ...], side: int) -> list[tuple[int, int, int, int]]:
    hid = n_out // 4
    w = [n_in, hid, hid, hid, n_out]
    out = [(w[i], w[i + 1], k, side) for i, k in enumerate(kernels)]
    if n_in != n_out:
        out.append((n_in, n_out, 1, side))  # id_path
    return out


def dvae_shape(cfg: DVAEModelConfig) -> ModelShape:
    convs = dvae_convs(cfg)
    params = sum(ci * co * k * k + co for ci, co, k, _ in convs)
    flops = sum(2.0 * ci * co * k * k * side * side for ci, co, k, side in convs)
    acts = sum(ci * side * side for ci, _, _, side in convs)
    grid = cfg.grid_size
    code_terms = 6 * cfg.vocab_size * grid * grid  # logits, log-softmax, softmax, gumbel noise and sample, KL
    pixel_terms = 8 * cfg.channels * cfg.image_size**2  # stats, mapped pixels, logit, |.|, exp
    n_blocks = 2 * cfg.n_groups * cfg.n_blk_per_group
    block = max(sum(ci * co * k * k + co for ci, co, k, _ in _resblock_convs(w, w, ENCODER_KERNELS, 1)) for w in group_widths(cfg))
    mats = tuple((co, ci * k * k, 1) for ci, co, k, _ in convs)
    return ModelShape(
        name="dvae",
        params=params,
        largest_layer=max(ci * co * k * k + co for ci, co, k, _ in convs),
        block_params=block,
        n_blocks=n_blocks,
        matrices=mats,
        tokens_per_sample=grid * grid,
        flops_fwd=flops,
        attention_flops_fwd=0.0,
        dense_attention_flops_fwd=0.0,
        recompute_flops_fwd=flops,
        act_elems=acts,
        act_fp32_elems=code_terms + pixel_terms,
        ckpt_act_elems=acts / max(n_blocks, 1) + sum(ci * side * side for ci, _, k, side in convs if k == 7),
        ckpt_act_fp32_elems=code_terms + pixel_terms,
        notes=(f"{cfg.image_size}x{cfg.image_size} pixels -> {grid}x{grid} codes; a 'token' is one code position",),
    )


__all__ = ["ModelShape", "transformer_shape", "dvae_shape", "transformer_params", "attention_pairs", "dvae_convs"]

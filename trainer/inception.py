"""Inception-v3 in plain torch (no torchvision), for FID and Inception Score in `tessera eval`.

The module tree reproduces the names of torchvision's `Inception3` exactly (`Conv2d_1a_3x3.conv.weight`,
`Conv2d_1a_3x3.bn.running_var`, `Mixed_5b.branch1x1...`, ..., `Mixed_7c...`, `AuxLogits...`, `fc`), so
two published state dicts load unchanged:

* ``"torchvision"``: torchvision's ImageNet weights (`Inception_V3_Weights.IMAGENET1K_V1`, fc with
  1000 classes, AuxLogits included). The pooling branches of the A/C/E blocks average over a 3x3
  window counting the zero padding (`F.avg_pool2d` defaults).
* ``"fid"``: the TensorFlow FID network as ported by pytorch-fid (`pt_inception-2015-12-05`, fc with
  1008 classes, no AuxLogits). Same tensors, three differences in the forward pass, all in pooling
  branches: the A/C/E blocks average without counting the padding (TensorFlow's 'SAME' average pool),
  and the last E block (`Mixed_7c`) max-pools instead.

`load_inception(state_dict)` picks the variant from the fc shape (1008 classes: "fid", otherwise
"torchvision") unless one is named.

Input: float images (N, 3, H, W) in [0, 1] of any size. They are resized bilinearly to 299x299
(`F.interpolate(..., align_corners=False)`, as pytorch-fid; TensorFlow's own resize differs slightly, so
values are close to, not bit-equal with, the TF reference) and normalised as the weights expect:

* torchvision: ImageNet mean/std normalisation followed by torchvision's `transform_input` (which
  `inception_v3(weights=...)` switches on for these weights, since they were ported from TensorFlow).
  Composed, the two give 2x - 1 up to rounding.
* fid: 2x - 1, as pytorch-fid.

Output of `forward`: (pool features float (N, 2048), class probabilities float (N, K)), the features
taken after the global average pool (FID's "pool3"), the probabilities a softmax over the classifier:

* torchvision: softmax over the 1000 ImageNet logits `fc(pool)`.
* fid: softmax over all 1008 logits, computed as `pool @ fc.weight.T` without the bias, which is what
  the original Inception Score code (Salimans et al. 2016, improved-gan; also torch-fidelity's
  `logits_unbiased` and the TTUR code) does with the `softmax/logits/MatMul` weight of this network.
  Keeping all 1008 classes and dropping the bias keeps IS comparable with published values.

Dropout (before fc) and the auxiliary classifier play no part in evaluation and are not run.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("torchvision", "fid")
FID_CLASSES = 1008
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_SIZE = 299

# factorised 7-wide kernels: a row (1, 7) and a column (7, 1), each "same"-padded
_ROW7 = {"kernel": (1, 7), "padding": (0, 3)}
_COL7 = {"kernel": (7, 1), "padding": (3, 0)}
_ROW3 = {"kernel": (1, 3), "padding": (0, 1)}
_COL3 = {"kernel": (3, 1), "padding": (1, 0)}


class ConvBN(nn.Module):
    """Bias-free convolution, batch norm (eps 1e-3, as the TF original) and ReLU: the network's unit."""

    def __init__(self, c_in: int, c_out: int, kernel: int | tuple[int, int], stride: int = 1, padding: int | tuple[int, int] = 0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _same_pool(x: torch.Tensor, mode: str) -> torch.Tensor:
    """3x3, stride 1, padding 1 pooling of a block's pool branch.

    "avg": zeros of the padding count in the mean (torchvision); "avg_tf": they do not (TensorFlow);
    "max": max pooling (the FID network's last block).
    """
    if mode == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=(mode == "avg"))


def _seq(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


class InceptionA(nn.Module):
    """35x35 grid block (Mixed_5b/5c/5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 224 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int, pool: str = "avg"):
        super().__init__()
        self.pool_mode = pool
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _seq(x, self.branch5x5_1, self.branch5x5_2),
                _seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.branch_pool(_same_pool(x, self.pool_mode)),
            ],
            1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a): strided 3x3 | 1x1-3x3-strided 3x3 | strided max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                _seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionC(nn.Module):
    """17x17 grid block with factorised 7x7 convolutions (Mixed_6b..6e), 768 channels out."""

    def __init__(self, c_in: int, channels_7x7: int, pool: str = "avg"):
        super().__init__()
        c7 = channels_7x7
        self.pool_mode = pool
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, _ROW7["kernel"], padding=_ROW7["padding"])
        self.branch7x7_3 = ConvBN(c7, 192, _COL7["kernel"], padding=_COL7["padding"])
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, _COL7["kernel"], padding=_COL7["padding"])
        self.branch7x7dbl_3 = ConvBN(c7, c7, _ROW7["kernel"], padding=_ROW7["padding"])
        self.branch7x7dbl_4 = ConvBN(c7, c7, _COL7["kernel"], padding=_COL7["padding"])
        self.branch7x7dbl_5 = ConvBN(c7, 192, _ROW7["kernel"], padding=_ROW7["padding"])
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                _seq(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                _seq(x, self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5),
                self.branch_pool(_same_pool(x, self.pool_mode)),
            ],
            1,
        )


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a): 1x1-strided 3x3 | 1x1-1x7-7x1-strided 3x3 | strided max pool."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, _ROW7["kernel"], padding=_ROW7["padding"])
        self.branch7x7x3_3 = ConvBN(192, 192, _COL7["kernel"], padding=_COL7["padding"])
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                _seq(x, self.branch3x3_1, self.branch3x3_2),
                _seq(x, self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4),
                F.max_pool2d(x, 3, stride=2),
            ],
            1,
        )


class InceptionE(nn.Module):
    """8x8 grid block with split 1x3 / 3x1 outputs (Mixed_7b, 7c): 320 + 768 + 768 + 192 = 2048 channels."""

    def __init__(self, c_in: int, pool: str = "avg"):
        super().__init__()
        self.pool_mode = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, _ROW3["kernel"], padding=_ROW3["padding"])
        self.branch3x3_2b = ConvBN(384, 384, _COL3["kernel"], padding=_COL3["padding"])
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, _ROW3["kernel"], padding=_ROW3["padding"])
        self.branch3x3dbl_3b = ConvBN(384, 384, _COL3["kernel"], padding=_COL3["padding"])
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_1(x)
        b = _seq(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(a),
                self.branch3x3_2b(a),
                self.branch3x3dbl_3a(b),
                self.branch3x3dbl_3b(b),
                self.branch_pool(_same_pool(x, self.pool_mode)),
            ],
            1,
        )


class InceptionAux(nn.Module):
    """The auxiliary classifier on the 17x17 grid (training only; here just a place for its tensors)."""

    def __init__(self, c_in: int, num_classes: int):
        super().__init__()
        self.conv0 = ConvBN(c_in, 128, 1)
        self.conv1 = ConvBN(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _seq(F.avg_pool2d(x, 5, stride=3), self.conv0, self.conv1)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class InceptionV3(nn.Module):
    """Inception-v3 with torchvision's parameter names; `forward(images in [0, 1])` -> (pool features, probabilities).

    variant: "torchvision" or "fid" (see the module docstring); num_classes: fc outputs (1000 for
    torchvision's weights, 1008 for the FID weights); aux_logits: hold the auxiliary classifier's
    tensors (never run), for state dicts that carry them.
    """

    def __init__(self, num_classes: int = 1000, variant: str = "torchvision", aux_logits: bool = False):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"Inception-v3 variant must be one of {', '.join(VARIANTS)}, got '{variant}'")
        self.variant = variant
        tf = variant == "fid"
        avg = "avg_tf" if tf else "avg"
        # stem: 299 -> 149 -> 147 -> 147 -> (max pool) 73 -> 73 -> 71 -> (max pool) 35
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32, avg)
        self.Mixed_5c = InceptionA(256, 64, avg)
        self.Mixed_5d = InceptionA(288, 64, avg)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128, avg)
        self.Mixed_6c = InceptionC(768, 160, avg)
        self.Mixed_6d = InceptionC(768, 160, avg)
        self.Mixed_6e = InceptionC(768, 192, avg)
        self.AuxLogits = InceptionAux(768, num_classes) if aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, avg)
        self.Mixed_7c = InceptionE(2048, "max" if tf else avg)
        self.fc = nn.Linear(2048, num_classes)

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, H, W) in [0, 1] -> the network's input (N, 3, 299, 299)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception-v3 expects images (N, 3, H, W), got {tuple(images.shape)}")
        x = images.float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        if self.variant == "fid":
            return 2 * x - 1
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        x = (x - mean) / std  # the ImageNet normalisation of the weights' preset transforms
        return x * (std / 0.5) + (mean - 0.5) / 0.5  # torchvision's transform_input, on for these weights

    def pool_features(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed input (N, 3, 299, 299) -> the 2048 global-average-pooled features ("pool3")."""
        x = _seq(x, self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _seq(x, self.Conv2d_3b_1x1, self.Conv2d_4a_3x3)
        x = F.max_pool2d(x, 3, stride=2)
        x = _seq(x, self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a)
        x = _seq(x, self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e)
        x = _seq(x, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)

    def logits(self, pool: torch.Tensor) -> torch.Tensor:
        """Class logits from pool features: fc, or for the FID variant fc without its bias (the IS convention)."""
        if self.variant == "fid":
            return pool @ self.fc.weight.t()
        return self.fc(pool)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = self.pool_features(self.preprocess(images))
        return pool, self.logits(pool).softmax(-1)


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_inception(state_dict: Mapping[str, Any], variant: str | None = None) -> InceptionV3:
    """An eval-mode InceptionV3 holding `state_dict` (torchvision's or pytorch-fid's naming).

    variant: "torchvision", "fid", or None to pick from the fc shape (1008 classes: "fid").
    AuxLogits.* tensors are ignored; missing BatchNorm `num_batches_tracked` counters are allowed
    (older exports lack them). Anything else that does not match raises ValueError with a one-line
    account: missing tensors, unexpected tensors, shape mismatches (a few names each).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"the file holds a {type(state_dict).__name__}, not a state dict")
    if "state_dict" in state_dict and isinstance(state_dict["state_dict"], Mapping):
        state_dict = state_dict["state_dict"]
    sd = dict(state_dict)
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    not_tensors = [str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"entries that are not tensors: {_names(not_tensors)}")
    sd = {k: v for k, v in sd.items() if not k.startswith("AuxLogits.")}
    fc = sd.get("fc.weight")
    num_classes = int(fc.shape[0]) if fc is not None and fc.dim() == 2 else 1000
    if variant is None:
        variant = "fid" if num_classes == FID_CLASSES else "torchvision"
    net = InceptionV3(num_classes, variant, aux_logits=False)
    expected = net.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k} is {tuple(sd[k].shape)}, not {tuple(expected[k].shape)}" for k in expected if k in sd and sd[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
    if mismatched:
        problems.append(f"{len(mismatched)} of another shape ({_names(mismatched)})")
    if problems:
        raise ValueError(f"as the {variant} variant with {num_classes} classes, " + "; ".join(problems))
    net.load_state_dict(sd, strict=False)
    return net.eval().requires_grad_(False)


__all__ = ["InceptionV3", "load_inception", "VARIANTS", "FID_CLASSES"]

#!/usr/bin/env python
"""Convert the released OpenAI dVAE (github.com/openai/DALL-E, encoder.pkl / decoder.pkl) to a Tessera
dVAE checkpoint that `tessera.trainer.dvae.load_dvae` reads.

Nothing is downloaded: pass local files. Each input is either a state dict saved with
`torch.save(module.state_dict(), path)` (loaded with weights_only=True), or OpenAI's pickled module
(`encoder.pkl`, needs their `dall_e` package importable and `--trust-pickle`, since unpickling runs
code from the file). Tessera's module and parameter names equal OpenAI's (`blocks.input.w`,
`blocks.group_1.block_1.res_path.conv_1.b`, ...), so conversion is a check of names and shapes
plus reading the hyperparameters off the tensor shapes.

    python scripts/convert_openai_dvae.py --encoder encoder.pkl --decoder decoder.pkl \
        --output dvae_openai.pt --trust-pickle          # image_size defaults to 256

The result is a checkpoint of kind "dvae" (EMA = the released weights), usable as
`tessera prep encode --dvae dvae_openai.pt ...`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tessera.core.errors import CheckpointError, InputError  # noqa: E402


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"OpenAI dVAE file '{path}' does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not trust_pickle:
            raise CheckpointError(
                f"'{path}' is not a plain state dict ({type(e).__name__}); if it is OpenAI's pickled module, pass --trust-pickle (with their dall_e package importable)"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise CheckpointError(f"'{path}' cannot be unpickled ({type(e2).__name__}: {str(e2).splitlines()[0][:100]})") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"'{path}' holds neither a module nor a state dict of tensors")
    return {k: v.float() for k, v in obj.items()}


def _count(sd: dict, pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.match(pattern, k))})


def infer_config(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], image_size: int):
    """DVAEModelConfig read off the tensor shapes."""
    from tessera.trainer.config import DVAEModelConfig

    try:
        n_hid, channels = enc["blocks.input.w"].shape[:2]
        vocab = enc["blocks.output.conv.w"].shape[0]
        n_init = dec["blocks.input.w"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"state dict lacks {e.args[0]!r}; is it an OpenAI dVAE encoder/decoder?") from None
    n_groups = _count(enc, r"blocks\.group_(\d+)\.")
    n_blk = _count(enc, r"blocks\.group_1\.block_(\d+)\.")
    if dec["blocks.input.w"].shape[1] != vocab:
        raise CheckpointError(f"decoder vocabulary {dec['blocks.input.w'].shape[1]} differs from the encoder's {vocab}")
    return DVAEModelConfig(
        image_size=image_size,
        channels=int(channels),
        n_hid=int(n_hid),
        n_groups=n_groups,
        n_blk_per_group=n_blk,
        vocab_size=int(vocab),
        n_init=int(n_init),
    )


def convert(enc: dict[str, torch.Tensor], dec: dict[str, torch.Tensor], image_size: int = 256):
    """(DVAE, DVAEModelConfig) holding the given OpenAI encoder/decoder weights."""
    from tessera.trainer.dvae import DVAE

    cfg = infer_config(enc, dec, image_size)
    cfg.validate()
    model = DVAE(cfg)
    for part, sd in (("encoder", enc), ("decoder", dec)):
        target = getattr(model, part)
        mine = target.state_dict()
        missing, extra = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
        if missing or extra:
            raise CheckpointError(f"OpenAI {part}: names do not match (missing {missing[:3]}, unexpected {extra[:3]})")
        bad = [k for k in mine if mine[k].shape != sd[k].shape]
        if bad:
            raise CheckpointError(f"OpenAI {part}: shape of {bad[0]} is {tuple(sd[bad[0]].shape)}, expected {tuple(mine[bad[0]].shape)}")
        target.load_state_dict(sd)
    return model.eval(), cfg


def main(argv: list[str] | None = None) -> int:
    from tessera.core import config as C
    from tessera.core.files import save_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--encoder", required=True, help="local encoder.pkl or encoder state dict")
    ap.add_argument("--decoder", required=True, help="local decoder.pkl or decoder state dict")
    ap.add_argument("--output", required=True, help="Tessera checkpoint to write (kind 'dvae')")
    ap.add_argument("--image-size", type=int, default=256, help="input side the model is used at (default 256, as released)")
    ap.add_argument("--trust-pickle", action="store_true", help="allow unpickling OpenAI's .pkl module files (runs code from them)")
    args = ap.parse_args(argv)
    try:
        enc = read_state_dict(args.encoder, args.trust_pickle)
        dec = read_state_dict(args.decoder, args.trust_pickle)
        model, cfg = convert(enc, dec, args.image_size)
        sd = model.state_dict()
        save_checkpoint(args.output, "dvae", {"step": 0, "model": sd, "ema": sd, "model_cfg": C.to_dict(cfg), "source": "openai/DALL-E"})
    except (InputError, CheckpointError) as e:
        print(f"convert_openai_dvae: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {cfg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

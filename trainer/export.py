"""`tessera export RUN_DIR --output DIR`: a self-contained inference directory (CONTRACTS.md item 7).

    DIR/config.json             {"format", "version", "name", "dtype", "transformer": model config,
                                 "dvae": dVAE model config, "tokenizer": {...}, "clip": {...} | null,
                                 "sample": default sampling config, "source": {run, step}}
    DIR/model.safetensors       transformer.* (EMA weights when the run kept an EMA), dvae_decoder.*,
                                clip.* (with --clip); fp32 or fp16 (--dtype)
    DIR/tokenizer.model(.json)  the caption tokenizer and its sidecar
    DIR/clip_tokenizer.model(.json)  the CLIP's tokenizer (with --clip)

The transformer comes from the run's latest checkpoint, or, when the run holds a DeepSpeed ZeRO
checkpoint directory (a folder with a `latest` file), from DeepSpeed's zero_to_fp32 consolidation, or, for
the sharded layout (`checkpoints/latest.sharded`), from its ordinal shards joined into whole tensors
(tessera.cluster.sharded.consolidate_sharded_checkpoint; the EMA's shards too).
The dVAE and tokenizer are those named by the token manifest the run trained on (recorded in the
checkpoint), unless --dvae / --tokenizer say otherwise. Every file is written to a temporary name
and renamed; config.json is written last, so a directory with a config.json is complete.
`tessera.trainer.inference.load(DIR)` reads it with model definitions and safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from tessera import __version__
from tessera.cluster.engine import consolidate_zero_checkpoint, zero_checkpoint_client_state
from tessera.cluster.sharded import LATEST as SHARDED_LATEST
from tessera.cluster.sharded import consolidate_sharded_checkpoint
from tessera.core import config as C
from tessera.core.errors import CheckpointError, InputError
from tessera.core.files import atomic_write_bytes, load_checkpoint
from tessera.core.root_config import from_run_dict
from tessera.dataprep.tokenizer import load_tokenizer, sidecar_path
from tessera.trainer.dvae import load_dvae
from tessera.trainer.transformer import DALLE
from tessera.trainer.transformer_train import model_config_from_dict

EXPORT_FORMAT = "tessera-export-1"


def find_zero_checkpoint(run_dir: Path) -> Path | None:
    """A DeepSpeed checkpoint folder inside the run (a `latest` file naming a tag folder beside it), if any.

    The transformer trainer writes them to `RUN/checkpoints/zero/` (cluster.zero_stage > 0).
    """
    if not run_dir.is_dir():
        return None
    for cand in [run_dir, *sorted(p for p in run_dir.rglob("*") if p.is_dir())]:
        if len(cand.relative_to(run_dir).parts) > 3:
            continue
        latest = cand / "latest"
        if latest.is_file():
            tag = latest.read_text(errors="replace").strip()
            if tag and (cand / tag).is_dir():
                return cand
    return None


def _transformer_from_zero(run_dir: Path, zero_dir: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Consolidate ZeRO shards into one fp32 state dict (DeepSpeed's zero_to_fp32, via tessera.cluster.engine).

    The model config and the EMA weights (ZeRO 1/2 runs that keep one) come from the client state
    saved with the checkpoint; a checkpoint without one falls back to the run's config.toml.
    """
    try:
        sd = consolidate_zero_checkpoint(zero_dir)
        step, client = zero_checkpoint_client_state(zero_dir)
    except ImportError:
        raise InputError(f"run '{run_dir}' holds a DeepSpeed ZeRO checkpoint ({zero_dir}) but deepspeed is not installed") from None
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"ZeRO checkpoint '{zero_dir}' cannot be consolidated ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})"
        ) from None
    sd = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in sd.items()}
    if client.get("model_cfg"):
        model_cfg = client["model_cfg"]
    else:
        cfg_path = run_dir / "config.toml"
        if not cfg_path.exists():
            raise InputError(f"run '{run_dir}': config.toml is missing (needed for the model config of a ZeRO checkpoint)")
        model_cfg = dataclasses.asdict(from_run_dict(C.load_toml(cfg_path)).transformer.model)
    weights = sd
    if use_ema and client.get("ema"):
        weights = {**sd, **{k: v for k, v in client["ema"].items() if k in sd}}
    meta = {k: client.get(k) for k in ("train_data", "dvae", "tokenizer")}
    meta.update(step=step, weights="ema" if weights is not sd else "model", consolidated_from=str(zero_dir))
    return weights, model_cfg, meta


def _transformer_from_sharded(run_dir: Path, ck_dir: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """The sharded layout's checkpoint (FSDP2 shards per local ordinal) joined into one state dict, with its whole EMA."""
    step, client, sd = consolidate_sharded_checkpoint(ck_dir, "transformer")
    if not client.get("model_cfg"):
        raise CheckpointError(f"sharded checkpoint in '{ck_dir}' lacks model_cfg")
    weights = sd
    if use_ema and client.get("ema"):
        weights = {**sd, **{k: v for k, v in client["ema"].items() if k in sd}}
    meta = {k: client.get(k) for k in ("train_data", "dvae", "tokenizer")}
    meta.update(step=step, weights="ema" if weights is not sd else "model", consolidated_from=str(ck_dir))
    return weights, client["model_cfg"], meta


def _transformer_state(run_dir: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """(weights, model config dict, checkpoint metadata) of a run dir or checkpoint file."""
    zero = find_zero_checkpoint(run_dir) if run_dir.is_dir() else None
    if zero is not None and not (run_dir / "checkpoints" / "latest.pt").exists():
        return _transformer_from_zero(run_dir, zero, use_ema)
    if run_dir.is_dir() and (run_dir / "checkpoints" / SHARDED_LATEST).is_file() and not (run_dir / "checkpoints" / "latest.pt").exists():
        return _transformer_from_sharded(run_dir, run_dir / "checkpoints", use_ema)
    ck = load_checkpoint(run_dir, "transformer")
    if "model_cfg" not in ck or "model" not in ck:
        raise CheckpointError(f"checkpoint '{run_dir}' lacks model_cfg or model weights")
    weights = ck["ema"] if (use_ema and ck.get("ema")) else ck["model"]
    meta = {k: ck.get(k) for k in ("step", "train_data", "dvae", "tokenizer")}
    meta["weights"] = "ema" if weights is ck.get("ema") else "model"
    return weights, ck["model_cfg"], meta


def _tensor_bytes(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> bytes:

    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu()
        if v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    return save(out, metadata={"format": EXPORT_FORMAT})


def _checked_transformer(run_dir: Path, use_ema: bool) -> tuple[DALLE, Any, dict]:
    """(model, model config, checkpoint metadata): the run's weights loaded into the architecture they claim.

    Checked before anything is written: weights that do not match the config are refused.
    """
    weights, model_cfg, meta = _transformer_state(run_dir, use_ema)
    mcfg = model_config_from_dict(model_cfg)
    model = DALLE(mcfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"run '{run_dir}': transformer weights do not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return model, mcfg, meta


def _checked_dvae(run_dir: Path, dvae: str | Path | None, meta: dict, mcfg: Any) -> tuple[Any, Any]:
    """(dVAE model, its config): --dvae or the one the token manifest names, matching the transformer's image vocabulary and grid."""
    dvae_path = dvae or meta.get("dvae")
    if not dvae_path:
        raise InputError(f"run '{run_dir}': its token manifest names no dVAE; pass --dvae PATH")
    dvae_model, dvae_cfg = load_dvae(dvae_path)
    if dvae_cfg.vocab_size != mcfg.image_vocab or dvae_cfg.grid_size != mcfg.image_grid:
        raise InputError(
            f"dVAE '{dvae_path}': vocabulary {dvae_cfg.vocab_size} / grid {dvae_cfg.grid_size} do not match the transformer's {mcfg.image_vocab} / {mcfg.image_grid}"
        )
    return dvae_model, dvae_cfg


def _checked_tokenizer(run_dir: Path, tokenizer: str | Path | None, meta: dict, mcfg: Any) -> tuple[Any, str | Path]:
    """(tokenizer, its path): --tokenizer or the one the token manifest names, no larger than the transformer's text_vocab."""
    tok_path = tokenizer or meta.get("tokenizer")
    if not tok_path:
        raise InputError(f"run '{run_dir}': its token manifest names no tokenizer; pass --tokenizer PATH")
    tok = load_tokenizer(tok_path)  # validates model file and sidecar
    if tok.vocab_size > mcfg.text_vocab:
        raise InputError(f"tokenizer '{tok_path}' has {tok.vocab_size} tokens, more than the transformer's text_vocab {mcfg.text_vocab}")
    return tok, tok_path


def _collect_tensors(
    model: DALLE, dvae_model: Any, clip: str | Path | None
) -> tuple[dict[str, torch.Tensor], dict | None, tuple[bytes, Any] | None]:
    """(tensors by exported name, the CLIP's config entry or None, (CLIP tokenizer bytes, sidecar) or None)."""
    tensors = {f"transformer.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"dvae_decoder.{k}": v for k, v in dvae_model.decoder.state_dict().items()})
    if clip is None:
        return tensors, None, None
    state = load_checkpoint(clip, "clip")
    try:
        tensors.update({f"clip.{k}": v for k, v in state["model"].items()})
        clip_meta = {"config": state["config"], "vocab_size": int(state["vocab_size"]), "tokenizer": "clip_tokenizer.model"}
        clip_tok = (state["tokenizer_bytes"].numpy().tobytes(), state["tokenizer_meta"])
    except KeyError as e:
        raise CheckpointError(f"CLIP checkpoint '{clip}' lacks {e.args[0]!r}") from None
    return tensors, clip_meta, clip_tok


def _write_payload(
    out: Path, tensors: dict[str, torch.Tensor], dtype: str, tok_path: str | Path, clip_tok: tuple[bytes, Any] | None
) -> None:
    """Everything but config.json (removed first, so the directory reads as incomplete until it is back); atomic writes."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)  # the directory is incomplete until config.json is back
    atomic_write_bytes(out / "model.safetensors", _tensor_bytes(tensors, torch.float16 if dtype == "fp16" else torch.float32))
    atomic_write_bytes(out / "tokenizer.model", Path(tok_path).read_bytes())
    atomic_write_bytes(out / "tokenizer.model.json", sidecar_path(tok_path).read_bytes())
    if clip_tok is not None:
        clip_tok_bytes, clip_tok_meta = clip_tok
        atomic_write_bytes(out / "clip_tokenizer.model", clip_tok_bytes)
        atomic_write_bytes(out / "clip_tokenizer.model.json", json.dumps(clip_tok_meta).encode())
    else:
        for name in ("clip_tokenizer.model", "clip_tokenizer.model.json"):
            (out / name).unlink(missing_ok=True)


def _run_sample_defaults(run_dir: Path) -> tuple[dict, str]:
    """(the run's default sampling config, its name) from its config.toml; ({}, the folder name) without a usable one."""
    root_sample = {}
    cfg_path = run_dir / "config.toml" if run_dir.is_dir() else run_dir.parent.parent / "config.toml"
    name = run_dir.name
    if cfg_path.exists():
        try:
            root = from_run_dict(C.load_toml(cfg_path))
            root_sample, name = dataclasses.asdict(root.sample), root.name
        except Exception:  # an older or foreign config.toml: the defaults still apply
            root_sample = {}
    return root_sample, name


def export(
    run_dir: str | Path,
    output: str | Path,
    *,
    clip: str | Path | None = None,
    dtype: str = "fp32",
    dvae: str | Path | None = None,
    tokenizer: str | Path | None = None,
    use_ema: bool = True,
) -> dict[str, Any]:
    """Write the inference directory; returns a summary (paths, tensor counts, bytes)."""

    run_dir, out = Path(run_dir), Path(output)
    if not run_dir.exists():
        raise InputError(f"run '{run_dir}' does not exist")
    if dtype not in ("fp32", "fp16"):
        raise InputError(f"--dtype: expected fp32 or fp16, got {dtype!r}")
    model, mcfg, meta = _checked_transformer(run_dir, use_ema)
    dvae_model, dvae_cfg = _checked_dvae(run_dir, dvae, meta, mcfg)
    tok, tok_path = _checked_tokenizer(run_dir, tokenizer, meta, mcfg)
    tensors, clip_meta, clip_tok = _collect_tensors(model, dvae_model, clip)

    _write_payload(out, tensors, dtype, tok_path, clip_tok)
    root_sample, name = _run_sample_defaults(run_dir)
    config = {
        "format": EXPORT_FORMAT,
        "version": __version__,
        "name": name,
        "dtype": dtype,
        "transformer": dataclasses.asdict(mcfg),
        "dvae": dataclasses.asdict(dvae_cfg),
        "tokenizer": {"file": "tokenizer.model", "vocab_size": tok.vocab_size, "kind": tok.kind, "lowercase": tok.lowercase},
        "clip": clip_meta,
        "sample": root_sample,
        "source": {"run": str(run_dir.absolute()), "step": meta.get("step"), "weights": meta.get("weights", "model")},
    }
    atomic_write_bytes(out / "config.json", json.dumps(config, indent=1).encode())  # last: marks the directory complete
    size = (out / "model.safetensors").stat().st_size
    return {
        "output": str(out),
        "tensors": len(tensors),
        "bytes": size,
        "clip": clip_meta is not None,
        "dtype": dtype,
        "step": meta.get("step"),
    }


__all__ = ["export", "find_zero_checkpoint", "EXPORT_FORMAT"]

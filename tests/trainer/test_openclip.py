"""tessera.trainer.openclip: open_clip / OpenAI CLIP ViT checkpoints in plain torch - key names and shapes,
architecture inference, CLIP's BPE tokenizer on a tiny merges file, the end_of_text readout, the
scorer, and the hooks in tessera.trainer.clip / tessera.trainer.clip_train."""

from __future__ import annotations

import gzip

import pytest
import torch

from tessera.core.errors import CheckpointError, ConfigError, InputError
from tessera.trainer.clip import load_clip, load_scorer
from tessera.trainer.config import ClipConfig
from tessera.trainer.openclip import (
    MERGES_NAME,
    ClipTokenizer,
    OpenCLIP,
    OpenClipConfig,
    OpenClipScorer,
    config_from_state,
    is_openclip_checkpoint,
    load_openclip,
)

torch.set_num_threads(1)

# 5 merges -> vocabulary 256 bytes + 256 "</w>" bytes + 5 merges + 2 specials = 519
MERGES = ["h i</w>", "c a", "ca t</w>", "d o", "do g</w>"]
HI, CA, CAT, DO, DOG, SOT, EOT = 512, 513, 514, 515, 516, 517, 518
VOCAB = 519
TINY = OpenClipConfig(
    embed_dim=16,
    image_size=32,
    patch_size=8,
    vision_width=32,
    vision_layers=2,
    vision_heads=1,
    text_len=16,
    vocab_size=VOCAB,
    text_width=32,
    text_layers=2,
    text_heads=1,
)


def byte_id(ch: str, end: bool = False) -> int:
    """Id of a printable ASCII byte ("!".."~" come first in CLIP's byte order); +256 with </w>."""
    return ord(ch) - ord("!") + (256 if end else 0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("oc")
    with gzip.open(d / MERGES_NAME, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    torch.manual_seed(0)
    model = OpenCLIP(TINY)
    sd = model.state_dict()
    torch.save(sd, d / "tiny.pt")
    return d, sd


def test_state_dict_names_and_shapes(files):
    _, sd = files
    want = {
        "visual.conv1.weight": (32, 3, 8, 8),
        "visual.class_embedding": (32,),
        "visual.positional_embedding": (17, 32),
        "visual.ln_pre.weight": (32,),
        "visual.transformer.resblocks.1.attn.in_proj_weight": (96, 32),
        "visual.transformer.resblocks.1.attn.in_proj_bias": (96,),
        "visual.transformer.resblocks.1.attn.out_proj.weight": (32, 32),
        "visual.transformer.resblocks.0.ln_1.bias": (32,),
        "visual.transformer.resblocks.0.ln_2.weight": (32,),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": (128, 32),
        "visual.transformer.resblocks.0.mlp.c_proj.bias": (32,),
        "visual.ln_post.bias": (32,),
        "visual.proj": (32, 16),
        "token_embedding.weight": (VOCAB, 32),
        "positional_embedding": (16, 32),
        "transformer.resblocks.1.attn.out_proj.bias": (32,),
        "transformer.resblocks.1.mlp.c_proj.weight": (32, 128),
        "ln_final.weight": (32,),
        "text_projection": (32, 16),
        "logit_scale": (),
    }
    for k, shape in want.items():
        assert tuple(sd[k].shape) == shape, k
    assert "attn_mask" not in sd and not any(k.startswith("visual.conv1.bias") for k in sd)
    per_block = {
        "ln_1.weight",
        "ln_1.bias",
        "attn.in_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "ln_2.weight",
        "ln_2.bias",
        "mlp.c_fc.weight",
        "mlp.c_fc.bias",
        "mlp.c_proj.weight",
        "mlp.c_proj.bias",
    }
    expected = {
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_pre.bias",
        "visual.ln_post.weight",
        "visual.ln_post.bias",
        "visual.proj",
        "token_embedding.weight",
        "positional_embedding",
        "ln_final.weight",
        "ln_final.bias",
        "text_projection",
        "logit_scale",
    }
    for tower in ("visual.transformer", "transformer"):
        expected |= {f"{tower}.resblocks.{i}.{p}" for i in range(2) for p in per_block}
    assert set(sd) == expected
    assert config_from_state(sd) == TINY


def test_vit_b32_architecture_from_shapes():
    """OpenAI's ViT-B/32, built on the meta device: the inferred config and the parameter count
    OpenAI's notebook prints (151,277,313)."""
    cfg = OpenClipConfig(
        embed_dim=512,
        image_size=224,
        patch_size=32,
        vision_width=768,
        vision_layers=12,
        vision_heads=12,
        text_len=77,
        vocab_size=49408,
        text_width=512,
        text_layers=12,
        text_heads=8,
        quick_gelu=True,
    )
    with torch.device("meta"):
        model = OpenCLIP(cfg)
    sd = model.state_dict()
    assert tuple(sd["visual.positional_embedding"].shape) == (50, 768)
    assert tuple(sd["transformer.resblocks.11.attn.in_proj_weight"].shape) == (1536, 512)
    assert config_from_state(sd, quick_gelu=True) == cfg
    assert sum(p.numel() for p in model.parameters()) == 151_277_313


def test_load_round_trip_strict_and_wrapped(files, tmp_path):
    d, sd = files
    scorer = load_openclip(d / "tiny.pt")
    assert isinstance(scorer, OpenClipScorer) and scorer.cfg == TINY
    for k, v in scorer.model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # {"state_dict": {"module." + k: ...}} (open_clip training checkpoints) and .safetensors
    from safetensors.torch import save_file

    wrapped = d / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, wrapped)
    st = d / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    ids = scorer.tokenize(["cat dog"])
    ref = scorer.model.encode_text(ids)
    for p in (wrapped, st):
        assert is_openclip_checkpoint(p)
        other = load_openclip(p)
        assert torch.allclose(other.model.encode_text(ids), ref)
    # a key missing or an extra one: strict matching, one line naming the file
    partial = d / "partial.pt"
    torch.save({k: v for k, v in sd.items() if k != "visual.ln_post.weight"}, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pt.*visual\.ln_post\.weight") as e:
        load_openclip(partial)
    assert "\n" not in str(e.value)


def test_tokenizer_ids(files):
    d, _ = files
    tok = ClipTokenizer(d / MERGES_NAME)
    assert tok.vocab_size == VOCAB and (tok.sot_id, tok.eot_id) == (SOT, EOT)
    assert tok.encode("Hi") == [HI]
    assert tok.encode("cat  dog!") == [CAT, DOG, byte_id("!", end=True)]
    assert tok.encode("ca") == [byte_id("c"), byte_id("a", end=True)]  # "c a" merges but "ca</w>" is no token
    assert tok.encode("do") == [byte_id("d"), byte_id("o", end=True)]
    assert tok.encode("dogs") == [DO, byte_id("g"), byte_id("s", end=True)]
    assert tok.encode("a 42") == [byte_id("a", end=True), byte_id("4", end=True), byte_id("2", end=True)]  # digits split one by one
    assert tok.encode("it's") == [byte_id("i"), byte_id("t", end=True), byte_id("'"), byte_id("s", end=True)]
    assert tok.decode(tok.encode("Cat dogs!")) == "cat dogs !"
    ids = tok(["hi", "cat dog"], context_length=16)
    assert ids.shape == (2, 16) and ids.dtype == torch.long
    assert ids[0].tolist() == [SOT, HI, EOT] + [0] * 13
    assert ids[1].tolist() == [SOT, CAT, DOG, EOT] + [0] * 12
    long = tok("hi " * 20, context_length=16)[0].tolist()  # truncated, end_of_text kept last
    assert long == [SOT] + [HI] * 14 + [EOT]
    exact = tok("hi " * 14, context_length=16)[0].tolist()
    assert exact == long


def test_text_reads_end_of_text_position(files):
    d, _ = files
    scorer = load_openclip(d / "tiny.pt")
    ids = scorer.tokenize(["cat dog", "hi"])
    base = scorer.model.encode_text(ids)
    changed = ids.clone()
    changed[0, 4:] = torch.tensor([HI, CAT, 7] + [DO] * 9)  # after end_of_text (position 3)
    changed[1, 3:] = 5
    assert torch.allclose(scorer.model.encode_text(changed), base, atol=1e-6)
    before = ids.clone()
    before[0, 1] = HI  # before end_of_text: the embedding moves
    assert not torch.allclose(scorer.model.encode_text(before)[0], base[0], atol=1e-4)
    assert torch.allclose(base.norm(dim=-1), torch.ones(2))
    with pytest.raises(InputError, match=r"\(B, 16\)"):
        scorer.model.encode_text(ids[:, :8])


def test_scorer_shapes_and_ordering(files, monkeypatch):
    d, _ = files
    scorer = load_openclip(d / "tiny.pt")
    imgs = torch.rand(3, 3, 32, 32)
    assert scorer.image_embeddings(imgs).shape == (3, 16)
    assert scorer.image_features(imgs).shape == (3, 32)
    assert scorer.text_embeddings(["a", "b", "c", "d"]).shape == (4, 16)
    assert scorer.similarity(imgs, ["cat", "dog"]).shape == (3, 2)
    assert scorer.score(imgs, ["a", "b", "c"]).shape == (3,)
    with pytest.raises(InputError, match="3 images but 2 captions"):
        scorer.score(imgs, ["a", "b"])
    # preprocessing: a 48x64 image is resized to 32x43 (shortest side) and center-cropped to 32x32
    import numpy as np
    from PIL import Image

    x = scorer.as_batch(torch.rand(2, 3, 48, 64))
    assert x.shape == (2, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    pil = scorer.as_batch([Image.fromarray(np.full((48, 64, 3), 200, np.uint8)), np.zeros((40, 30, 3), np.uint8)])
    assert pil.shape == (2, 3, 32, 32) and torch.allclose(pil[0], torch.full((3, 32, 32), 200 / 255), atol=1e-6) and pil[1].max() == 0
    assert scorer.image_embeddings([Image.new("RGB", (50, 40))]).shape == (1, 16)
    # ordering, on embeddings we choose: image 1 matches the caption best, then image 2, then 0
    text = torch.nn.functional.normalize(torch.tensor([[1.0] + [0.0] * 15]), dim=-1)
    img = torch.nn.functional.normalize(torch.tensor([[-1.0, 1.0] + [0.0] * 14, [1.0, 0.1] + [0.0] * 14, [1.0, 1.0] + [0.0] * 14]), dim=-1)
    monkeypatch.setattr(scorer, "image_embeddings", lambda images, batch_size=256: img[: len(images)])
    monkeypatch.setattr(scorer, "text_embeddings", lambda caps, batch_size=512: text.expand(len(caps), -1))
    s = scorer.score(imgs, ["x"] * 3)
    assert torch.allclose(s, (img @ text.t()).squeeze(1))
    assert scorer.rerank(imgs, "x", top=2).tolist() == [1, 2]
    assert scorer.rerank(imgs, "x", top=5).tolist() == [1, 2, 0]


def test_load_scorer_and_errors(files, tmp_path):
    d, sd = files
    assert isinstance(load_scorer(d / "tiny.pt"), OpenClipScorer)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "again.safetensors"))
    assert isinstance(load_clip(d / "again.safetensors"), OpenClipScorer)
    # truncated file
    cut = d / "cut.pt"
    cut.write_bytes((d / "tiny.pt").read_bytes()[:5000])
    assert not is_openclip_checkpoint(cut)
    with pytest.raises(CheckpointError, match=r"cut\.pt.*truncated or corrupt"):
        load_openclip(cut)
    with pytest.raises(CheckpointError, match=r"cut\.pt"):
        load_scorer(cut)
    # an unrelated state dict: one line naming the file
    unrelated = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "conv1.weight": torch.zeros(1)}, unrelated)
    for fn in (load_openclip, load_scorer):
        with pytest.raises(CheckpointError, match=r"resnet\.pt") as e:
            fn(unrelated)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        load_openclip(tmp_path / "nope.pt")
    # no merges file beside the checkpoint; a merges file of the wrong size
    alone = tmp_path / "alone"
    alone.mkdir()
    torch.save(sd, alone / "m.pt")
    with pytest.raises(InputError, match=MERGES_NAME):
        load_openclip(alone / "m.pt")
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt") as f:
        f.write("#version: 0.2\nh i</w>\n")
    with pytest.raises(CheckpointError, match="519-token vocabulary but the merges file gives 515"):
        load_openclip(alone / "m.pt", merges=short)
    assert load_openclip(alone / "m.pt", merges=d / MERGES_NAME).cfg == TINY


def test_train_clip_uses_checkpoint(files, tmp_path):
    from tessera.trainer.clip_train import train_clip

    d, _ = files
    small = dict(image_size=32, embed_dim=16)
    m = train_clip(ClipConfig(**small, checkpoint=str(d / "tiny.pt")), None, "unused.model", tmp_path / "run")
    assert m["open_clip"] and m["checkpoint"] == str(d / "tiny.pt") and "will be used" in m["summary"]
    assert not (tmp_path / "run").exists()
    cut = tmp_path / "cut.pt"
    cut.write_bytes((d / "tiny.pt").read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"clip\.checkpoint.*cut\.pt") as e:
        train_clip(ClipConfig(**small, checkpoint=str(cut)), None, "unused.model", tmp_path / "run")
    assert "\n" not in str(e.value)

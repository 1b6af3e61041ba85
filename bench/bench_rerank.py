"""Where the demo's shape accuracy is lost: the transformer's candidates against what a reranker keeps.

For a finished `tessera demo --output DIR`, draws `--candidates` samples for each of the 18 demo
prompts from DIR/export (the demo keeps the best 4 of 64 by CLIP score), runs the project's detector
on every candidate and reports:

- per-candidate accuracy by (size, shape): what the transformer + dVAE draw before any choice;
- top-`--keep` accuracy (shape, colour, size) of several rankings of the same candidates:
  oracle (detector-correct candidates first: the bound of any reranker over these candidates),
  random, the export's CLIP (what the demo does), the transformer's own log P(image given caption),
  and the two combined (the sum of their z-scores within each prompt's candidates).

With `--seeds N` the whole draw is repeated for seeds seed .. seed+N-1 and every figure is the mean:
one draw keeps only 72 images, whose shape accuracy has a binomial spread of about +-0.06.

    python bench/bench_rerank.py --demo-dir runs/demo [--candidates 64] [--keep 4] [--seed 0] [--seeds 1]
        [--set top_k=8 --set temperature=0.9 ...] [--report FILE]

`--set` changes the export's sampling settings ([sample] keys) for this study.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

from tessera.core.root_config import TesseraConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def top_accuracy(scores: torch.Tensor, dets: list[dict], prompts: list[dict], k: int, keep: int) -> dict[str, float]:
    ok = {"shape": 0, "color": 0, "size": 0}
    for i, p in enumerate(prompts):
        for j in scores[i * k : (i + 1) * k].argsort(descending=True)[:keep].tolist():
            for a in ok:
                ok[a] += dets[i * k + j][a] == p[a]
    return {a: round(v / (keep * len(prompts)), 3) for a, v in ok.items()}


def one_draw(pipe, prompts: list[dict], caps: list[str], k: int, keep: int, seed: int, scfg) -> dict:
    """Draw k candidates per prompt with `seed`, score them, and return the per-candidate and top-`keep` figures."""
    from tessera.dataprep import detector
    from tessera.trainer.inference import rerank_scores

    t0 = time.time()
    # log P(image given caption), kept while sampling (tessera.trainer.sample.sample_codes: equal to a full pass)
    codes, logp = pipe.generate_codes(caps, k, scfg, torch.Generator().manual_seed(seed), with_logp=True)
    images = pipe.decode(codes)
    gen_s = time.time() - t0
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype("uint8")
    dets = [detector.detect(x) for x in arr]

    per: dict[str, list[bool]] = {}
    for i, p in enumerate(prompts):
        per.setdefault(f"{p['size']} {p['shape']}", []).extend(dets[i * k + j]["shape"] == p["shape"] for j in range(k))
    rankings = {
        "oracle (detector-correct shape first)": torch.tensor(
            [float(d["shape"] == prompts[i // k]["shape"]) + 1e-3 * torch.rand(()).item() for i, d in enumerate(dets)]
        ),
        "random": torch.rand(len(dets), generator=torch.Generator().manual_seed(seed + 1)),
        "transformer log P(image given caption)": logp,
    }
    if pipe.clip is not None:
        clip = torch.cat([pipe.clip.score(images[i * k : (i + 1) * k], [c] * k) for i, c in enumerate(caps)])
        rankings["export CLIP (the demo)"] = clip
        # what sample.rerank = "clip+logp" keeps: the two z-scores over each prompt's candidates, added
        rankings["CLIP + log P (z-scores per prompt)"] = torch.cat(
            [rerank_scores(clip[i * k : (i + 1) * k], logp[i * k : (i + 1) * k]) for i in range(len(caps))]
        )
    return {"generate_s": gen_s, "per": per, "tops": {name: top_accuracy(s, dets, prompts, k, keep) for name, s in rankings.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", required=True, help="a `tessera demo` output dir (its export/)")
    ap.add_argument("--candidates", type=int, default=64, help="samples drawn per prompt")
    ap.add_argument("--keep", type=int, default=4, help="samples kept per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="repeat the draw for this many seeds and average")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a [sample] setting for this study")
    ap.add_argument("--report", default=None, help="markdown file to append the result to")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from tessera.core import config as C
    from tessera.dataprep import synthetic
    from tessera.demo import demo_prompts
    from tessera.trainer.inference import load

    pipe = load(Path(a.demo_dir) / "export")
    scfg = C.load(
        TesseraConfig, None, [f"sample.{kv}" for kv in a.set], base={"sample": dataclasses.asdict(pipe.default_sample_config)}
    ).sample
    prompts = demo_prompts()
    caps = [synthetic.caption(p) for p in prompts]
    k = a.candidates
    draws = [one_draw(pipe, prompts, caps, k, a.keep, a.seed + i, scfg) for i in range(a.seeds)]
    gen_s = sum(d["generate_s"] for d in draws) / len(draws)
    per: dict[str, list[bool]] = {}
    for d in draws:
        for key, v in d["per"].items():
            per.setdefault(key, []).extend(v)
    per_candidate = {key: round(sum(v) / len(v), 3) for key, v in sorted(per.items())}
    overall = round(sum(sum(v) for v in per.values()) / sum(len(v) for v in per.values()), 3)
    tops = {
        name: {attr: round(sum(d["tops"][name][attr] for d in draws) / len(draws), 3) for attr in draws[0]["tops"][name]}
        for name in draws[0]["tops"]
    }

    res = {
        "demo_dir": str(a.demo_dir),
        "candidates": k,
        "keep": a.keep,
        "seed": a.seed,
        "seeds": a.seeds,
        "set": a.set,
        "generate_s": round(gen_s, 1),
        "per_candidate_shape": overall,
        "per_candidate_shape_by_size": per_candidate,
        "top": tops,
    }
    print(json.dumps(res, indent=1))
    if a.report:
        lines = [
            f"\n### rerank study: {a.demo_dir}, {k} candidates per prompt, keep {a.keep}, seeds {a.seed}..{a.seed + a.seeds - 1}{' ' + ' '.join(a.set) if a.set else ''} "
            f"({platform.processor() or platform.machine()}, {a.threads} threads)\n",
            f"\nPer-candidate shape {overall}: " + ", ".join(f"{key} {v}" for key, v in per_candidate.items()) + "\n\n",
            "| ranking | shape | colour | size |\n|---|---|---|---|\n",
        ]
        lines += [f"| {name} | {t['shape']} | {t['color']} | {t['size']} |\n" for name, t in tops.items()]
        with open(a.report, "a") as f:
            f.writelines(lines)


if __name__ == "__main__":
    main()

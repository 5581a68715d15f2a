"""Image scorers for benchmark tables: the published preference / aesthetic models, loaded from local files only.

- "pickscore": PickScore_v1, a CLIP-H/14 pair model (transformers CLIPModel + CLIPProcessor folders);
  score = logit_scale * cos(image, prompt).
- "hpsv2": HPS v2 / v2.1, the open_clip ViT-H-14 checkpoint read into transformers' CLIPModel; score =
  cos(image, prompt).
- "imagereward": ImageReward v1.0, BLIP + MLP from ImageReward.pt (the `image-reward` package's layout) and
  med_config.json, on transformers' BLIP modules; score = the package's standardised reward.
- "aesthetic": the LAION aesthetic predictor v2, CLIP ViT-L/14 (transformers folder) + the LAION MLP over the
  normalised image embedding; prompt-free.
- "taste": the demo's reward (cgkernels.demo): it scores only captions of the demo world.

Every weight is a local path given by the user (the `--<scorer>-<option>` flags of python/evaluate.py); nothing is
downloaded. A missing file is an error naming it and the flag. All run on the core dependencies (transformers);
`pip install 'cgkernels[eval]'` adds ftfy (the CLIP tokenizers' text clean-up, as the published models had it).
"""
from __future__ import annotations

from cgkernels.scorers.common import Scorer, ScorerInputError

__all__ = ["SCORERS", "PATH_OPTIONS", "Scorer", "ScorerInputError", "make_scorer", "flag"]

SCORERS = ("taste", "pickscore", "hpsv2", "imagereward", "aesthetic")

# scorer -> {keyword of its builder: help text of the flag --<scorer>-<keyword>}
PATH_OPTIONS = {
    "taste": {},
    "pickscore": {"model": "local PickScore_v1 folder (CLIPModel: config.json + weights)",
                  "processor": "local CLIP-ViT-H-14 processor folder (default: the --pickscore-model folder)"},
    "hpsv2": {"checkpoint": "local HPS_v2_compressed.pt or HPS_v2.1_compressed.pt",
              "tokenizer": "local CLIP-ViT-H-14 tokenizer folder (the --pickscore-processor folder serves)"},
    "imagereward": {"checkpoint": "local ImageReward.pt",
                    "med_config": "local med_config.json of ImageReward (BLIP's BERT config)",
                    "tokenizer": "local bert-base-uncased tokenizer folder (BLIP's text tokenizer)"},
    "aesthetic": {"clip": "local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14: model + processor)",
                  "head": "local sac+logos+ava1-l14-linearMSE.pth (or a .safetensors of it)"},
}


def flag(scorer: str, option: str) -> str:
    return f"--{scorer}-{option.replace('_', '-')}"


def make_scorer(name: str, device: str = "cpu", **paths) -> Scorer:
    """The scorer `name` built from local paths (keywords: PATH_OPTIONS[name])."""
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(SCORERS)}")
    unknown = set(paths) - set(PATH_OPTIONS[name])
    if unknown:
        raise TypeError(f"scorer {name!r} takes {sorted(PATH_OPTIONS[name]) or 'no paths'}, got {sorted(unknown)}")
    if name == "taste":
        from cgkernels.scorers.taste import TasteScorer

        return TasteScorer()
    if name == "pickscore":
        from cgkernels.scorers.clip_scorers import PickScore

        return PickScore(paths.get("model"), paths.get("processor"), device=device)
    if name == "aesthetic":
        from cgkernels.scorers.clip_scorers import AestheticScore

        return AestheticScore(paths.get("clip"), paths.get("head"), device=device)
    if name == "hpsv2":
        from cgkernels.scorers.hpsv2 import HPSv2

        return HPSv2(paths.get("checkpoint"), paths.get("tokenizer"), device=device)
    from cgkernels.scorers.imagereward import ImageRewardScore

    return ImageRewardScore(paths.get("checkpoint"), paths.get("med_config"), paths.get("tokenizer"), device=device)

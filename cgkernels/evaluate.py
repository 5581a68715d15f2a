"""Evaluation harness: pair a method's images with a baseline's by (prompt, seed), score both, report mean scores
and win rates (share of pairs where the method's score beats the baseline's, ties half; as the NPO release).

Image folders: PNG/JPEG files with either a sidecar JSON of the same stem (as python/sample.py writes: "prompt",
"seed", optional "strength") or a `metadata.jsonl` whose lines carry "file_name", "prompt", "seed" (and optional
"strength"). A method folder may hold a strength sweep: every strength is scored as its own method.

Scorers are plug-ins: "taste" (the demo's reward, built in); "pickscore", "hpsv2", "imagereward", "aesthetic"
when their weights are given as local paths. Their packages are imported only when asked for, and a missing
package or weight file is a clear error naming it. Nothing is ever downloaded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    prompt: str
    seed: int
    strength: Optional[float] = None


def read_image_folder(folder) -> list[ImageRecord]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    metadata = folder / "metadata.jsonl"
    if metadata.exists():
        rows = [json.loads(line) for line in metadata.read_text().splitlines() if line.strip()]
        records = [_record(folder / row["file_name"], row, metadata) for row in rows]
    else:
        records = []
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            sidecar = image.with_suffix(".json")
            if not sidecar.exists():
                raise ValueError(f"{image} has no sidecar {sidecar.name} (and {folder} has no metadata.jsonl)")
            records.append(_record(image, json.loads(sidecar.read_text()), sidecar))
    if not records:
        raise ValueError(f"no images found in {folder}")
    return records


def _record(path: Path, row: dict, source: Path) -> ImageRecord:
    for key in ("prompt", "seed"):
        if key not in row:
            raise ValueError(f"{source}: missing {key!r} for {path.name}")
    strength = row.get("strength")
    return ImageRecord(path, str(row["prompt"]), int(row["seed"]), None if strength is None else float(strength))


def pair_by_prompt_and_seed(method: list[ImageRecord], baseline: list[ImageRecord]):
    """{strength: [(method record, baseline record), ...]} over the (prompt, seed) keys both sides have."""
    by_key = {}
    for record in baseline:
        key = (record.prompt, record.seed)
        if key in by_key:
            raise ValueError(f"baseline has two images for prompt {record.prompt!r} seed {record.seed}")
        by_key[key] = record
    groups: dict[Optional[float], list] = {}
    for record in method:
        match = by_key.get((record.prompt, record.seed))
        if match is not None:
            groups.setdefault(record.strength, []).append((record, match))
    if not groups:
        raise ValueError("no (prompt, seed) pair is shared by the method and baseline folders")
    return groups


def win_rate(scores, baseline_scores) -> float:
    scores, baseline_scores = np.asarray(scores, float), np.asarray(baseline_scores, float)
    return float(((scores > baseline_scores) + 0.5 * (scores == baseline_scores)).mean())


# A scorer maps (PIL images, prompts) to one float per image.
Scorer = Callable[[list, list], np.ndarray]


def taste_scorer() -> Scorer:
    from cgkernels.demo.reward import taste_rewards

    return lambda images, prompts: taste_rewards([np.asarray(image.convert("RGB")) for image in images], prompts)


def _require_package(module: str, install: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"this scorer needs the {module!r} package: pip install {install}") from error


def _require_path(path, what: str) -> Path:
    if path is None:
        raise ValueError(f"this scorer needs {what} given as a local path (cgkernels never downloads weights)")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def _load_state_dict(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def _projected(features):
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return features if hasattr(features, "norm") else features.pooler_output


def _clip_embeddings(model, processor, images, prompts, device):
    import torch

    with torch.no_grad():
        image_inputs = processor(images=images, return_tensors="pt").to(device)
        image_embeds = _projected(model.get_image_features(**image_inputs))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = None
        if prompts is not None:
            text_inputs = processor(text=prompts, padding=True, truncation=True, return_tensors="pt").to(device)
            text_embeds = _projected(model.get_text_features(**text_inputs))
            text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    return image_embeds, text_embeds


def pickscore_scorer(model_path, processor_path=None, device: str = "cpu") -> Scorer:
    """PickScore: logit_scale * cos(image, prompt) with a local PickScore_v1 CLIPModel folder and its processor
    (the CLIP-ViT-H-14 processor folder; default: the model folder)."""
    model_path = _require_path(model_path, "the PickScore model folder (yuvalkirstain/PickScore_v1)")
    processor_path = _require_path(processor_path or model_path, "the PickScore processor folder")
    transformers = _require_package("transformers", "transformers")
    model = transformers.CLIPModel.from_pretrained(str(model_path), local_files_only=True).eval().to(device)
    processor = transformers.CLIPProcessor.from_pretrained(str(processor_path), local_files_only=True)

    def score(images, prompts):
        image_embeds, text_embeds = _clip_embeddings(model, processor, images, prompts, device)
        scale = model.logit_scale.detach().exp()
        return (scale * (image_embeds * text_embeds).sum(-1)).cpu().numpy()

    return score


class AestheticHead:
    """The LAION aesthetic predictor v2 MLP (1024-128-64-16-1 over the normalised CLIP image embedding)."""

    def __init__(self, state: dict):
        import torch

        layers = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.")})
        self.linears = []
        for index in layers:
            linear = torch.nn.Linear(*state[f"layers.{index}.weight"].shape[::-1])
            linear.load_state_dict({"weight": state[f"layers.{index}.weight"], "bias": state[f"layers.{index}.bias"]})
            self.linears.append(linear.eval())
        if not self.linears:
            raise ValueError("aesthetic head weights have no 'layers.N.weight' entries")

    def __call__(self, embeddings):
        for linear in self.linears:  # dropout only between them at training time; no activations (as released)
            embeddings = linear(embeddings)
        return embeddings.squeeze(-1)


def aesthetic_scorer(clip_path, head_path, device: str = "cpu") -> Scorer:
    """LAION aesthetic predictor: a local CLIP ViT-L/14 folder (openai/clip-vit-large-patch14) and the MLP file
    (sac+logos+ava1-l14-linearMSE.pth or a .safetensors of it)."""
    clip_path = _require_path(clip_path, "the CLIP ViT-L/14 folder for the aesthetic predictor")
    head_path = _require_path(head_path, "the aesthetic predictor weights (sac+logos+ava1-l14-linearMSE.pth)")
    import torch

    transformers = _require_package("transformers", "transformers")
    model = transformers.CLIPModel.from_pretrained(str(clip_path), local_files_only=True).eval().to(device)
    processor = transformers.CLIPProcessor.from_pretrained(str(clip_path), local_files_only=True)
    head = AestheticHead(_load_state_dict(head_path))
    for linear in head.linears:
        linear.to(device)

    def score(images, prompts):
        image_embeds, _ = _clip_embeddings(model, processor, images, None, device)
        with torch.no_grad():
            return head(image_embeds.float()).cpu().numpy()

    return score


def hpsv2_scorer(checkpoint_path, device: str = "cpu") -> Scorer:
    """HPSv2 / v2.1: open_clip ViT-H-14 with the HPS checkpoint (HPS_v2_compressed.pt / HPS_v2.1_compressed.pt)."""
    checkpoint_path = _require_path(checkpoint_path, "the HPSv2 checkpoint (HPS_v2.1_compressed.pt)")
    open_clip = _require_package("open_clip", "open_clip_torch")
    import torch

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
    model.load_state_dict(_load_state_dict(checkpoint_path))
    model.eval()
    tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def score(images, prompts):
        with torch.no_grad():
            pixels = torch.stack([preprocess(image) for image in images]).to(device)
            image_embeds = model.encode_image(pixels, normalize=True)
            text_embeds = model.encode_text(tokenizer(prompts).to(device), normalize=True)
        return (image_embeds * text_embeds).sum(-1).cpu().numpy()

    return score


def imagereward_scorer(checkpoint_path, med_config_path, device: str = "cpu") -> Scorer:
    """ImageReward v1.0: the `image-reward` package's model, ImageReward.pt and its med_config.json, both local.
    (Its BLIP text side also needs the bert-base-uncased tokenizer in the local Hugging Face cache.)"""
    checkpoint_path = _require_path(checkpoint_path, "the ImageReward checkpoint (ImageReward.pt)")
    med_config_path = _require_path(med_config_path, "ImageReward's med_config.json")
    module = _require_package("ImageReward.ImageReward", "image-reward")
    model = module.ImageReward(med_config=str(med_config_path), device=device).to(device)
    model.load_state_dict(_load_state_dict(checkpoint_path), strict=False)
    model.eval()

    def score(images, prompts):
        return np.asarray([model.score(prompt, [image]) for image, prompt in zip(images, prompts)], dtype=float)

    return score


SCORERS = ("taste", "pickscore", "hpsv2", "imagereward", "aesthetic")


def make_scorer(name: str, *, weights=None, processor=None, extra=None, device: str = "cpu") -> Scorer:
    """weights: the scorer's model folder or checkpoint; processor / extra: PickScore's processor folder,
    the aesthetic MLP file, ImageReward's med_config.json."""
    if name == "taste":
        return taste_scorer()
    if name == "pickscore":
        return pickscore_scorer(weights, processor, device)
    if name == "aesthetic":
        return aesthetic_scorer(weights, extra, device)
    if name == "hpsv2":
        return hpsv2_scorer(weights, device)
    if name == "imagereward":
        return imagereward_scorer(weights, extra, device)
    raise ValueError(f"unknown scorer {name!r}; expected one of {', '.join(SCORERS)}")


def _score_records(scorer: Scorer, records: list[ImageRecord], batch_size: int) -> np.ndarray:
    scores = []
    for start in range(0, len(records), batch_size):
        chunk = records[start: start + batch_size]
        images = [Image.open(record.path).convert("RGB") for record in chunk]
        scores.append(np.asarray(scorer(images, [record.prompt for record in chunk]), dtype=float))
    return np.concatenate(scores)


def evaluate(images_dir, baseline_dir, scorers: dict[str, Scorer], batch_size: int = 16) -> list[dict]:
    """One row per (scorer, strength): n pairs, method and baseline mean score, win rate."""
    groups = pair_by_prompt_and_seed(read_image_folder(images_dir), read_image_folder(baseline_dir))
    rows = []
    baseline_records = list({b.path: b for pairs in groups.values() for _, b in pairs}.values())
    for scorer_name, scorer in scorers.items():
        # Each baseline image is scored once per scorer, however many strengths it is compared with.
        scored = _score_records(scorer, baseline_records, batch_size)
        baseline_score = {record.path: score for record, score in zip(baseline_records, scored)}
        for strength, pairs in sorted(groups.items(), key=lambda item: (item[0] is not None, item[0] or 0.0)):
            method_scores = _score_records(scorer, [m for m, _ in pairs], batch_size)
            baseline_scores = np.asarray([baseline_score[b.path] for _, b in pairs])
            rows.append({
                "scorer": scorer_name,
                "strength": strength,
                "pairs": len(pairs),
                "prompts": len({m.prompt for m, _ in pairs}),
                "mean_score": float(method_scores.mean()),
                "baseline_mean_score": float(baseline_scores.mean()),
                "win_rate": win_rate(method_scores, baseline_scores),
            })
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| scorer | strength | pairs | mean score | baseline mean | win rate |", "|---|---|---|---|---|---|"]
    for row in rows:
        strength = "-" if row["strength"] is None else f"{row['strength']:g}"
        lines.append(f"| {row['scorer']} | {strength} | {row['pairs']} | {row['mean_score']:.4f} | "
                     f"{row['baseline_mean_score']:.4f} | {row['win_rate']:.3f} |")
    return "\n".join(lines)

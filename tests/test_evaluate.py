"""The evaluation harness: pairing by prompt and seed, win rates, scorer plug-ins and their errors."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cgkernels import evaluate
from cgkernels.demo import reward, world


def _scene_image(rng, saturation_boost: bool):
    image = world.render(world.Scene("large", "red", "circle", "in the center"), rng, resolution=24)
    if not saturation_boost:  # wash the image out towards grey: the taste dislikes it
        image = 0.5 * image + 0.25
    return (image * 255).round().astype(np.uint8)


def _write_folder(folder, entries, *, sidecar=True):
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (image, prompt, seed, strength) in enumerate(entries):
        name = f"{i:03d}.png"
        Image.fromarray(image).save(folder / name)
        row = {"prompt": prompt, "seed": seed}
        if strength is not None:
            row["strength"] = strength
        if sidecar:
            (folder / f"{i:03d}.json").write_text(json.dumps(row))
        else:
            lines.append(json.dumps({"file_name": name, **row}))
    if not sidecar:
        (folder / "metadata.jsonl").write_text("\n".join(lines))


def test_pairs_by_prompt_and_seed_and_reports_win_rates(tmp_path):
    rng = np.random.default_rng(0)
    prompts = ["a large red circle in the center", "a small blue square at the top left"]
    baseline = [(_scene_image(rng, False), p, s, None) for p in prompts for s in (1, 2)]
    # The method folder: a sweep of two strengths, shuffled order, plus one image with no baseline partner.
    vivid = [(_scene_image(rng, True), p, s, 2.0) for p in prompts for s in (2, 1)]
    washed = [(_scene_image(rng, False), p, s, 1.0) for p in prompts for s in (1, 2)]
    unmatched = [(_scene_image(rng, True), prompts[0], 99, 2.0)]
    _write_folder(tmp_path / "base", baseline)
    _write_folder(tmp_path / "method", vivid + washed + unmatched, sidecar=False)

    taste = evaluate.taste_scorer()
    scored_images = []

    def counting_taste(images, prompts):
        scored_images.extend(images)
        return taste(images, prompts)

    rows = evaluate.evaluate(tmp_path / "method", tmp_path / "base", {"taste": counting_taste})
    assert len(scored_images) == len(baseline) + len(vivid) + len(washed)  # each baseline image scored once
    by_strength = {row["strength"]: row for row in rows}
    assert set(by_strength) == {1.0, 2.0}
    assert by_strength[2.0]["pairs"] == 4 and by_strength[2.0]["prompts"] == 2
    expected_base = reward.taste_rewards([b[0] for b in baseline], [b[1] for b in baseline]).mean()
    assert by_strength[2.0]["baseline_mean_score"] == pytest.approx(expected_base)
    assert by_strength[2.0]["mean_score"] == pytest.approx(reward.taste_rewards([v[0] for v in vivid], [v[1] for v in vivid]).mean())
    assert by_strength[2.0]["win_rate"] == 1.0  # vivid beats washed out on every (prompt, seed)
    assert by_strength[1.0]["mean_score"] < by_strength[2.0]["mean_score"]
    assert "| taste | 2 | 4 |" in evaluate.format_rows(rows)


def test_win_rate_counts_ties_as_half():
    assert evaluate.win_rate([1.0, 2.0, 3.0, 0.0], [0.0, 2.0, 4.0, -1.0]) == pytest.approx(2.5 / 4)


def test_bad_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        evaluate.read_image_folder(tmp_path / "missing")
    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(ValueError, match="sidecar"):
        evaluate.read_image_folder(tmp_path / "a")
    rng = np.random.default_rng(1)
    _write_folder(tmp_path / "b", [(_scene_image(rng, True), "p", 1, None)])
    _write_folder(tmp_path / "c", [(_scene_image(rng, True), "q", 1, None)])
    with pytest.raises(ValueError, match="no \\(prompt, seed\\) pair"):
        evaluate.evaluate(tmp_path / "b", tmp_path / "c", {"taste": evaluate.taste_scorer()})


def test_scorers_need_local_weights_and_name_what_is_missing(tmp_path):
    with pytest.raises(ValueError, match="unknown scorer"):
        evaluate.make_scorer("clipscore")
    with pytest.raises(ValueError, match="local path"):
        evaluate.make_scorer("pickscore")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        evaluate.make_scorer("hpsv2", weights=tmp_path / "nowhere.pt")
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"")
    for name, module, extra in (("hpsv2", "open_clip", None), ("imagereward", "ImageReward", checkpoint)):
        try:
            __import__(module)
        except ImportError:
            with pytest.raises(ImportError, match=module):
                evaluate.make_scorer(name, weights=checkpoint, extra=extra)


def _tiny_clip_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cgkernels.testing import build_clip_tokenizer

    tokenizer = build_clip_tokenizer(world.caption_words(), tmp_path / "tok", model_max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_pickscore_and_aesthetic_scorers_with_local_weights(tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = _tiny_clip_folder(tmp_path)
    head = {"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
            "layers.2.weight": torch.randn(1, 8), "layers.2.bias": torch.randn(1)}
    save_file(head, tmp_path / "head.safetensors")
    rng = np.random.default_rng(2)
    images = [Image.fromarray(_scene_image(rng, True)) for _ in range(3)]
    prompts = ["a large red circle in the center"] * 3

    picks = evaluate.make_scorer("pickscore", weights=folder)(images, prompts)
    aesthetic = evaluate.make_scorer("aesthetic", weights=folder, extra=tmp_path / "head.safetensors")(images, prompts)

    # Independent computation in float64.
    from transformers import CLIPProcessor

    model, processor = CLIPModel.from_pretrained(folder).double(), CLIPProcessor.from_pretrained(folder)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].double()
        image_embeds = torch.nn.functional.normalize(evaluate._projected(model.get_image_features(pixel_values=pixels)), dim=-1)
        ids = processor(text=prompts, padding=True, return_tensors="pt")
        text_embeds = torch.nn.functional.normalize(evaluate._projected(model.get_text_features(**ids)), dim=-1)
    expected_picks = model.logit_scale.detach().exp() * (image_embeds * text_embeds).sum(-1)
    hidden = image_embeds @ head["layers.0.weight"].double().T + head["layers.0.bias"].double()
    expected_aesthetic = (hidden @ head["layers.2.weight"].double().T + head["layers.2.bias"].double()).squeeze(-1)
    np.testing.assert_allclose(picks, expected_picks.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(aesthetic, expected_aesthetic.numpy(), rtol=1e-4, atol=1e-4)

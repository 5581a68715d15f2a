"""The published scorers on their real architectures, built from tiny configs with random weights, saved in the
layout their checkpoints are published in, and loaded through the scorers' own loading paths. Preprocessing is
checked against the constants of the published processors (resize the short side to 224 bicubic, centre crop,
OpenAI CLIP mean/std)."""
import numpy as np
import pytest
import torch
from PIL import Image

from cgkernels import scorers
from cgkernels.scorers.common import CLIP_MEAN, CLIP_STD, load_state_dict
from cgkernels.testing import build_clip_tokenizer

WORDS = ["a", "red", "blue", "circle", "square", "photo", "of", "cat", "dog", "in", "the", "snow"]
PROMPTS = ["a photo of a cat", "a red square in the snow", "a blue dog"]
SIDE = 224  # the published CLIP-H/14 and CLIP-L/14 processors' crop: the tiny models keep the real resolution


def _images():
    rng = np.random.default_rng(0)
    # Not square and not 224: the resize of the short side and the centre crop both matter.
    # (227, 224): a crop offset of 1.5, which torchvision rounds to 2 and the transformers processor floors to 1.
    sizes = [(300, 260), (240, 320), (227, 224)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def _clip_folders(tmp_path, projection_dim: int):
    """A tiny CLIPModel folder and a separate processor folder with the published CLIP preprocessing config."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = build_clip_tokenizer(WORDS, tmp_path / "tok", model_max_length=77)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu",
                         # pooled at the end-of-text token, as the published configs say
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=SIDE, patch_size=32, hidden_act="gelu"),
        projection_dim=projection_dim,
    )
    torch.manual_seed(0)
    model = CLIPModel(config)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))  # PickScore's trained scale (the init is log(1/0.07))
    model.save_pretrained(tmp_path / "model")
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIDE}, crop_size={"height": SIDE, "width": SIDE},
                                         resample=3, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                                         do_convert_rgb=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(tmp_path / "processor")
    return tmp_path / "model", tmp_path / "processor"


def _reference_pixels(image: Image.Image, offset=lambda excess: int(round(excess / 2))) -> torch.Tensor:
    """The published CLIP preprocessing written out: short side to 224 (bicubic), centre crop 224, [0, 1], mean/std.
    `offset`: the crop offset from the excess length; torchvision (OpenAI's clip.load, ImageReward, open_clip)
    rounds half the excess, the transformers processor (PickScore) floors it."""
    width, height = image.size
    scale = SIDE / min(width, height)
    # The long side truncates, as torchvision's Resize(224) and the CLIP processors do.
    resized = image.convert("RGB").resize((int(width * scale), int(height * scale)), Image.BICUBIC)
    left, top = offset(resized.width - SIDE), offset(resized.height - SIDE)
    crop = np.asarray(resized.crop((left, top, left + SIDE, top + SIDE)), dtype=np.float64) / 255.0
    return torch.from_numpy(((crop - CLIP_MEAN) / CLIP_STD).transpose(2, 0, 1))


def _floor(excess):
    return excess // 2


def _check_preprocessing(scorer, images, offset=lambda excess: int(round(excess / 2))):
    pixels = scorer.pixel_values(images).double()
    expected = torch.stack([_reference_pixels(image, offset) for image in images])
    assert pixels.shape == (len(images), 3, SIDE, SIDE)
    assert (pixels - expected).abs().max() < 1e-5  # the same PIL resize; fp32 normalisation


def _float64_clip(model_path, processor_path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(model_path).double().eval(), CLIPProcessor.from_pretrained(processor_path)


def test_pickscore_published_layout_and_score(tmp_path):
    model_path, processor_path = _clip_folders(tmp_path, projection_dim=16)
    scorer = scorers.make_scorer("pickscore", model=model_path, processor=processor_path)
    images = _images()
    _check_preprocessing(scorer, images, _floor)
    scores = scorer(images, PROMPTS)

    model, processor = _float64_clip(model_path, processor_path)
    with torch.no_grad():
        pixels = processor(images=images, return_tensors="pt")["pixel_values"].double()
        image_embeds = torch.nn.functional.normalize(model.vision_model(pixel_values=pixels).pooler_output
                                                     @ model.visual_projection.weight.T, dim=-1)
        tokens = processor(text=PROMPTS, padding=True, return_tensors="pt")
        pooled = model.text_model(**tokens).pooler_output
        text_embeds = torch.nn.functional.normalize(pooled @ model.text_projection.weight.T, dim=-1)
    expected = 100.0 * (image_embeds * text_embeds).sum(-1)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-3)  # 100 * cos: fp32 rounding ~1e-5 of it
    assert np.ptp(scores) > 1e-3  # the three (image, prompt) pairs score differently: no constant passes
    # A prompt's score depends on the prompt: the text tower is in use.
    assert abs(scorer(images[:1], [PROMPTS[1]])[0] - scores[0]) > 1e-4


def test_aesthetic_published_layout_and_score(tmp_path):
    clip_path, processor_path = _clip_folders(tmp_path, projection_dim=768)
    for file in processor_path.iterdir():  # the published ViT-L/14 folder holds model and processor together
        (clip_path / file.name).write_bytes(file.read_bytes())

    class LaionMLP(torch.nn.Module):  # the released predictor's module: attribute `layers`, dropouts in between
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(
                torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
                torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    torch.manual_seed(1)
    mlp = LaionMLP().eval()
    torch.save(mlp.state_dict(), tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    scorer = scorers.make_scorer("aesthetic", clip=clip_path, head=tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    images = _images()
    _check_preprocessing(scorer, images)
    scores = scorer(images, PROMPTS)

    model, _ = _float64_clip(clip_path, clip_path)
    with torch.no_grad():
        pixels = torch.stack([_reference_pixels(image) for image in images])
        embeds = model.vision_model(pixel_values=pixels).pooler_output @ model.visual_projection.weight.T
        expected = mlp.double().layers(torch.nn.functional.normalize(embeds, dim=-1)).squeeze(-1)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-5)
    assert np.ptp(scores) > 1e-6
    # Prompt-free: the prompts do not enter.
    np.testing.assert_array_equal(scorer(images, ["x", "y", "z"]), scores)

    mismatched = tmp_path / "head_512.pth"
    torch.save({"layers.0.weight": torch.randn(4, 512), "layers.0.bias": torch.randn(4)}, mismatched)
    with pytest.raises(ValueError, match="512-d embeddings.*768-d"):
        scorers.make_scorer("aesthetic", clip=clip_path, head=mismatched)


def test_processor_that_does_not_match_the_model_is_refused(tmp_path):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    model_path, processor_path = _clip_folders(tmp_path, projection_dim=16)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    CLIPProcessor(image_processor=image_processor, tokenizer=CLIPTokenizer.from_pretrained(processor_path)
                  ).save_pretrained(tmp_path / "processor_336")
    with pytest.raises(ValueError, match="crops to 336x336 but the model .* takes 224x224"):
        scorers.make_scorer("pickscore", model=model_path, processor=tmp_path / "processor_336")


def test_missing_weights_and_packages_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="unknown scorer"):
        scorers.make_scorer("clipscore")
    with pytest.raises(ValueError, match="--pickscore-model"):
        scorers.make_scorer("pickscore")
    with pytest.raises(FileNotFoundError, match="nowhere.pt.*--hpsv2-checkpoint"):
        scorers.make_scorer("hpsv2", checkpoint=tmp_path / "nowhere.pt")
    with pytest.raises(ValueError, match="--imagereward-med-config"):
        scorers.make_scorer("imagereward", checkpoint=tmp_path)
    with pytest.raises(ValueError, match="--aesthetic-head"):
        scorers.make_scorer("aesthetic", clip=tmp_path)
    with pytest.raises(TypeError, match="takes"):
        scorers.make_scorer("hpsv2", model=tmp_path)
    checkpoint = tmp_path / "weights.pt"
    torch.save({"state_dict": {}}, checkpoint)
    with pytest.raises(ValueError, match="--imagereward-tokenizer"):
        scorers.make_scorer("imagereward", checkpoint=checkpoint, med_config=checkpoint)
    with pytest.raises(ValueError, match="--hpsv2-tokenizer"):
        scorers.make_scorer("hpsv2", checkpoint=checkpoint)


def test_checkpoint_wrappers_are_unwrapped(tmp_path):
    state = {"visual.proj": torch.randn(3, 2), "logit_scale": torch.tensor(4.6)}
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "HPS_v2_compressed.pt")  # as HPS publishes it
    loaded = load_state_dict(tmp_path / "HPS_v2_compressed.pt")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_taste_refuses_prompts_outside_the_demo_world():
    taste = scorers.make_scorer("taste")
    taste.check_prompts(["a large red circle in the center"])
    with pytest.raises(scorers.ScorerInputError, match="--scorer pickscore"):
        taste.check_prompts(["a large red circle in the center", "an astronaut riding a horse"])


def _attention(q, k, v, heads, key_mask=None, causal=False):
    b, n, d = q.shape
    split = lambda x: x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    logits = split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :].bool(), float("-inf"))
    if causal:
        logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return (logits.softmax(-1) @ split(v)).transpose(1, 2).reshape(b, n, d)


def _open_clip_reference_score(state: dict, pixels, ids, eos: int, vision_heads: int, text_heads: int):
    """HPS computed straight from an open_clip state dict in float64: ViT (ln_pre, pre-norm blocks with the fused
    in_proj, ln_post on the class token, @ proj), causal text transformer pooled at the end-of-text token
    (@ text_projection), cosine of the normalised embeddings."""
    f = {k: v.double() for k, v in state.items()}
    def ln(x, name):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], f[name + ".weight"], f[name + ".bias"])

    lin = lambda x, name: x @ f[name + ".weight"].T + f[name + ".bias"]  # noqa: E731

    def blocks(x, prefix, heads, causal):
        for i in range(len({k[len(prefix):].split(".")[0] for k in f if k.startswith(prefix)})):
            p = f"{prefix}{i}."
            q, k, v = (ln(x, p + "ln_1") @ f[p + "attn.in_proj_weight"].T + f[p + "attn.in_proj_bias"]).chunk(3, -1)
            x = x + lin(_attention(q, k, v, heads, causal=causal), p + "attn.out_proj")
            x = x + lin(torch.nn.functional.gelu(lin(ln(x, p + "ln_2"), p + "mlp.c_fc")), p + "mlp.c_proj")
        return x

    conv = f["visual.conv1.weight"]
    x = torch.nn.functional.conv2d(pixels.double(), conv, stride=conv.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([f["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + f["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre"), "visual.transformer.resblocks.", vision_heads, False)
    image = ln(x[:, 0], "visual.ln_post") @ f["visual.proj"]
    y = f["token_embedding.weight"][ids] + f["positional_embedding"][: ids.shape[1]]
    y = ln(blocks(y, "transformer.resblocks.", text_heads, True), "ln_final")
    text = y[torch.arange(len(ids)), (ids == eos).int().argmax(-1)] @ f["text_projection"]
    return (torch.nn.functional.normalize(image, dim=-1) * torch.nn.functional.normalize(text, dim=-1)).sum(-1)


def _to_open_clip_layout(hf_state: dict) -> dict:
    """A transformers CLIPModel state dict in open_clip's names (written from open_clip's module layout)."""
    out = {}
    for tower, src, dst in (("vision", "vision_model.encoder.layers.", "visual.transformer.resblocks."),
                            ("text", "text_model.encoder.layers.", "transformer.resblocks.")):
        for i in range(len({k[len(src):].split(".")[0] for k in hf_state if k.startswith(src)})):
            s, d = f"{src}{i}.", f"{dst}{i}."
            for kind in ("weight", "bias"):
                out[f"{d}attn.in_proj_{kind}"] = torch.cat([hf_state[f"{s}self_attn.{r}_proj.{kind}"] for r in "qkv"])
                for new, old in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                    out[f"{d}{new}.{kind}"] = hf_state[f"{s}{old}.{kind}"]
    for new, old in (("visual.class_embedding", "vision_model.embeddings.class_embedding"),
                     ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
                     ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
                     ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
                     ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
                     ("logit_scale", "logit_scale")):
        out[new] = hf_state[old]
    for new, old in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                     ("ln_final", "text_model.final_layer_norm")):
        out[new + ".weight"], out[new + ".bias"] = hf_state[old + ".weight"], hf_state[old + ".bias"]
    out["visual.proj"] = hf_state["visual_projection.weight"].T.contiguous()
    out["text_projection"] = hf_state["text_projection.weight"].T.contiguous()
    return out


def _hps_reference_pixels(image: Image.Image) -> torch.Tensor:
    """HPSv2's evaluation transform written out: to [0, 1], longest side to 224 (bicubic, antialiased, on the
    tensor), black bars centred to 224 x 224 (the odd pixel at the bottom / right), then CLIP mean/std."""
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)
    h, w = x.shape[1:]
    new_h, new_w = round(h * SIDE / max(h, w)), round(w * SIDE / max(h, w))
    x = torch.nn.functional.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True)[0]
    canvas = torch.zeros(3, SIDE, SIDE, dtype=torch.float64)
    top, left = (SIDE - new_h) // 2, (SIDE - new_w) // 2
    canvas[:, top: top + new_h, left: left + new_w] = x
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (canvas - mean.double()) / std.double()


def test_hpsv2_open_clip_checkpoint_and_score(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPTokenizer

    from cgkernels.scorers import hpsv2

    model_path, processor_path = _clip_folders(tmp_path, projection_dim=16)
    hf_state = {k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v  # no LayerNorm at identity
                for k, v in CLIPModel.from_pretrained(model_path).state_dict().items()}
    state = _to_open_clip_layout(hf_state)
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 1},
               tmp_path / "HPS_v2.1_compressed.pt")  # as a DDP run saves it
    # The tiny model's head sizes (ViT-H-14's are 80-wide vision heads and 16 text heads).
    monkeypatch.setitem(hpsv2.ARCHITECTURES, "tiny", {"vision_head_width": 16, "text_heads": 2, "hidden_act": "gelu"})
    scorer = hpsv2.HPSv2(tmp_path / "HPS_v2.1_compressed.pt", processor_path, architecture="tiny")
    images = _images()
    pixels = torch.stack([_hps_reference_pixels(image) for image in images])
    # fp32 antialiased bicubic against float64: well under one 8-bit level (1/255/std = 0.015 here).
    assert (scorer.pixel_values(images).double() - pixels).abs().max() < 1e-3
    scores = scorer(images, PROMPTS)
    tokenizer = CLIPTokenizer.from_pretrained(processor_path)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = _open_clip_reference_score(state, pixels, ids,
                                          tokenizer.eos_token_id, vision_heads=2, text_heads=2)
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    assert np.ptp(scores) > 1e-3
    assert abs(scorer(images[:1], [PROMPTS[1]])[0] - scores[0]) > 1e-5  # the prompt enters
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an open_clip CLIP state dict"):
        hpsv2.HPSv2(tmp_path / "other.pt", processor_path)


def _blip_reference_score(state: dict, med: dict, pixels: torch.Tensor, ids, mask) -> torch.Tensor:
    """ImageReward's score computed directly from the checkpoint's tensors in float64: BLIP's ViT (pre-norm blocks,
    LayerNorm eps 1e-6, exact GELU), BERT with cross-attention (post-norm), the [CLS] state through the MLP."""
    f = {k: v.double() for k, v in state.items() if v.is_floating_point()}
    gelu, layer_norm = torch.nn.functional.gelu, torch.nn.functional.layer_norm

    attention = _attention

    v = "blip.visual_encoder."
    width = f[v + "pos_embed"].shape[-1]
    x = torch.nn.functional.conv2d(pixels.double(), f[v + "patch_embed.proj.weight"], f[v + "patch_embed.proj.bias"],
                                   stride=f[v + "patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([f[v + "cls_token"].expand(len(x), 1, width), x], 1) + f[v + "pos_embed"]
    for i in range(len({k.split(".")[3] for k in f if k.startswith(v + "blocks.")})):
        p = f"{v}blocks.{i}."
        h = layer_norm(x, (width,), f[p + "norm1.weight"], f[p + "norm1.bias"], 1e-6)
        q, k, val = (h @ f[p + "attn.qkv.weight"].T + f[p + "attn.qkv.bias"]).chunk(3, -1)
        x = x + attention(q, k, val, width // 64) @ f[p + "attn.proj.weight"].T + f[p + "attn.proj.bias"]
        h = layer_norm(x, (width,), f[p + "norm2.weight"], f[p + "norm2.bias"], 1e-6)
        h = gelu(h @ f[p + "mlp.fc1.weight"].T + f[p + "mlp.fc1.bias"])
        x = x + h @ f[p + "mlp.fc2.weight"].T + f[p + "mlp.fc2.bias"]
    image = layer_norm(x, (width,), f[v + "norm.weight"], f[v + "norm.bias"], 1e-6)

    t, d, eps, heads = "blip.text_encoder.", med["hidden_size"], med["layer_norm_eps"], med["num_attention_heads"]
    lin = lambda x, name: x @ f[name + ".weight"].T + f[name + ".bias"]  # noqa: E731
    norm = lambda x, name: layer_norm(x, (d,), f[name + ".weight"], f[name + ".bias"], eps)  # noqa: E731
    y = f[t + "embeddings.word_embeddings.weight"][ids] + f[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    y = norm(y, t + "embeddings.LayerNorm")
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        for part, keys, key_mask in (("attention", y, mask), ("crossattention", image, None)):
            a = attention(lin(y, p + part + ".self.query"), lin(keys, p + part + ".self.key"),
                          lin(keys, p + part + ".self.value"), heads, key_mask)
            y = norm(lin(a, p + part + ".output.dense") + y, p + part + ".output.LayerNorm")
        y = norm(lin(gelu(lin(y, p + "intermediate.dense")), p + "output.dense") + y, p + "output.LayerNorm")
    r = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{index}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_imagereward_published_layout_and_score(tmp_path):
    import json

    from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    from cgkernels.scorers import imagereward

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "bert" / "vocab.txt"), do_lower_case=True).save_pretrained(tmp_path / "bert")
    # med_config.json as ImageReward ships it (BERT-base there; tiny here), vocab + BLIP's [DEC] and [ENC].
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 64,
           "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 2,
           "num_hidden_layers": 2, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(vocab) + 2,
           "encoder_width": 128, "add_cross_attention": True}
    (tmp_path / "med_config.json").write_text(json.dumps(med))

    torch.manual_seed(0)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=128, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=SIDE, patch_size=32,
                                              layer_norm_eps=1e-6))
    text = BlipTextModel(BlipTextConfig(vocab_size=med["vocab_size"], hidden_size=32, encoder_hidden_size=128,
                                        intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=40), add_pooling_layer=False)
    renames = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
               "embeddings.patch_embedding.": "patch_embed.proj.", "post_layernorm.": "norm.",
               "encoder.layers.": "blocks.", ".layer_norm1.": ".norm1.", ".layer_norm2.": ".norm2.",
               ".self_attn.qkv.": ".attn.qkv.", ".self_attn.projection.": ".attn.proj."}
    state = {}
    for name, value in vision.state_dict().items():  # BLIP's ViT names (timm), written from its layout
        for new, old in renames.items():
            name = name.replace(new, old)
        state["blip.visual_encoder." + name] = value + 0.02 * torch.randn_like(value)  # no LayerNorm at identity
    for name, value in text.state_dict().items():  # med.py's BertModel names, which transformers' port keeps
        noise = 0.02 * torch.randn_like(value) if value.is_floating_point() else 0
        state["blip.text_encoder." + name] = value + noise
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(40)[None]
    for index, (n_in, n_out) in zip((0, 2, 4, 6, 7), ((32, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        state[f"mlp.layers.{index}.weight"] = torch.randn(n_out, n_in) / n_in ** 0.5
        state[f"mlp.layers.{index}.bias"] = 0.1 * torch.randn(n_out)
    state["blip.vision_proj.weight"], state["blip.text_proj.weight"] = torch.randn(8, 128), torch.randn(8, 32)
    torch.save(state, tmp_path / "ImageReward.pt")

    scorer = scorers.make_scorer("imagereward", checkpoint=tmp_path / "ImageReward.pt",
                                 med_config=tmp_path / "med_config.json", tokenizer=tmp_path / "bert")
    images = _images()
    _check_preprocessing(scorer, images)
    scores = scorer(images, PROMPTS)
    tokens = scorer.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tokens.input_ids[0, 0] == vocab.index("[CLS]") and len(scorer.tokenizer) == med["vocab_size"]
    expected = _blip_reference_score(state, med, torch.stack([_reference_pixels(i) for i in images]),
                                     tokens.input_ids, tokens.attention_mask)
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-4)
    assert np.ptp(scores) > 1e-3
    assert abs(scorer(images[:1], [PROMPTS[1]])[0] - scores[0]) > 1e-5  # the prompt enters

    wrong = {k: v for k, v in state.items() if not k.startswith("mlp.")}
    torch.save(wrong, tmp_path / "not_imagereward.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        imagereward.ImageRewardScore(tmp_path / "not_imagereward.pt", tmp_path / "med_config.json", tmp_path / "bert")

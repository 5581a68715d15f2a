"""ImageReward v1.0 (Xu et al. 2023) on transformers' BLIP modules.

The published ImageReward.pt is the state dict of the `image-reward` package's ImageReward module: `blip.*`, a
BLIP ViT-L/16 image encoder (`blip.visual_encoder.*`, timm-style names) and a BERT text encoder with
cross-attention (`blip.text_encoder.*`, configured by med_config.json), and `mlp.layers.*`, an MLP 768-1024-128-
64-16-1. Its score: the prompt ([CLS] + BERT word pieces, at most 35 tokens) cross-attends to the image's patch
states; the [CLS] state goes through the MLP, standardised by the published mean and std.

The package itself does not import with transformers 5, so the weights are loaded here into transformers'
BlipVisionModel and BlipTextModel (ports of the same BLIP code: the text encoder's names are identical, the image
encoder's are renamed below), with the image pre-processing of the package (OpenAI CLIP's: resize the short side
to 224 bicubic, centre crop, CLIP mean/std) and the bert-base-uncased tokenizer with BLIP's two added tokens.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from cgkernels.scorers.clip_scorers import AestheticHead
from cgkernels.scorers.common import (
    Scorer, clip_preprocess, fingerprint, load_state_dict, require_path,
)

# The package's standardisation of the raw MLP output (ImageReward.py, v1.0).
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
MAX_PROMPT_TOKENS = 35
IMAGE_SIDE = 224


def _vision_name(name: str) -> str:
    """A BLIP ViT weight name (timm style) as transformers' BlipVisionModel calls it."""
    for old, new in (("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
                     ("patch_embed.proj.", "embeddings.patch_embedding."), ("norm.", "post_layernorm.")):
        if name.startswith(old):
            return new + name[len(old):]
    if not name.startswith("blocks."):
        raise ValueError(f"unexpected weight in ImageReward's image encoder: {name!r}")
    name = "encoder.layers." + name[len("blocks."):]
    for old, new in ((".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
                     (".attn.proj.", ".self_attn.projection.")):
        name = name.replace(old, new)
    return name


def vision_state(state: dict) -> dict:
    """blip.visual_encoder.* of the checkpoint, renamed for BlipVisionModel."""
    prefix = "blip.visual_encoder."
    return {_vision_name(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}


def text_state(state: dict) -> dict:
    prefix = "blip.text_encoder."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}


def _vision_config(state: dict):
    from transformers import BlipVisionConfig

    patch = state["embeddings.patch_embedding.weight"]
    width, _, patch_size, _ = patch.shape
    positions = state["embeddings.position_embedding"].shape[1] - 1
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layers."))
    heads = max(1, width // 64)  # BLIP's ViTs have 64-wide heads (ViT-L/16: 1024 wide, 16 heads)
    return BlipVisionConfig(hidden_size=width, intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=layers, num_attention_heads=heads, patch_size=patch_size,
                            image_size=int(round(positions ** 0.5)) * patch_size, layer_norm_eps=1e-6,
                            hidden_act="gelu")


def _text_config(med_config: dict):
    from transformers import BlipTextConfig

    return BlipTextConfig(
        vocab_size=med_config["vocab_size"], hidden_size=med_config["hidden_size"],
        encoder_hidden_size=med_config["encoder_width"], intermediate_size=med_config["intermediate_size"],
        num_hidden_layers=med_config["num_hidden_layers"], num_attention_heads=med_config["num_attention_heads"],
        max_position_embeddings=med_config["max_position_embeddings"], hidden_act=med_config.get("hidden_act", "gelu"),
        layer_norm_eps=med_config.get("layer_norm_eps", 1e-12), hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, pad_token_id=med_config.get("pad_token_id", 0))


class ImageRewardScore(Scorer):
    name = "imagereward"

    def __init__(self, checkpoint_path, med_config_path, tokenizer_path=None, device: str = "cpu"):
        checkpoint_path = require_path(checkpoint_path, self.name, "checkpoint",
                                       "the ImageReward checkpoint (ImageReward.pt)")
        med_config_path = require_path(med_config_path, self.name, "med_config", "ImageReward's med_config.json")
        tokenizer_path = require_path(tokenizer_path, self.name, "tokenizer",
                                      "the bert-base-uncased tokenizer folder (BLIP's text tokenizer)")
        import transformers
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        state = load_state_dict(checkpoint_path)
        if not any(k.startswith("blip.visual_encoder.") for k in state) or "mlp.layers.0.weight" not in state:
            raise ValueError(f"{checkpoint_path} is not an ImageReward checkpoint (no blip.visual_encoder.* / "
                             "mlp.layers.*)")
        vision = vision_state(state)
        self.device = device
        self.vision = transformers.BlipVisionModel(_vision_config(vision)).eval()
        self.vision.load_state_dict(vision)
        self.text = BlipTextModel(_text_config(json.loads(med_config_path.read_text())), add_pooling_layer=False)
        result = self.text.load_state_dict(text_state(state), strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{checkpoint_path}: the text encoder does not match {med_config_path} (missing "
                             f"{missing[:3]}, unexpected {result.unexpected_keys[:3]})")
        self.text.eval()
        self.mlp = AestheticHead({k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.")})
        self.vision.to(device), self.text.to(device), self.mlp.to(device)
        self.tokenizer = transformers.BertTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        # BLIP's tokenizer: bert-base-uncased plus a [DEC] bos token and an [ENC] token (vocab 30522 + 2).
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
        self.fingerprint = fingerprint(self.name, checkpoint_path, med_config_path, tokenizer_path)

    def pixel_values(self, images) -> torch.Tensor:
        return torch.stack([clip_preprocess(image, IMAGE_SIDE) for image in images])

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        image_states = self.vision(pixel_values=self.pixel_values(images).to(self.device)).last_hidden_state
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                                return_tensors="pt").to(self.device)
        image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=self.device)
        text_states = self.text(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                                encoder_hidden_states=image_states, encoder_attention_mask=image_mask).last_hidden_state
        rewards = self.mlp(text_states[:, 0, :].float())
        return ((rewards - REWARD_MEAN) / REWARD_STD).cpu().numpy()

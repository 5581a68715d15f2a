"""HPS v2 / v2.1 (Wu et al. 2023): open_clip's ViT-H-14 fine-tuned on human preferences. The published checkpoints
(HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) hold {"state_dict": <open_clip CLIP state dict>}. Score = cos(image
embedding, prompt embedding), as HPSv2's own scoring (the diagonal of image_features @ text_features.T).

The open_clip weights are loaded into transformers' CLIPModel, the same architecture (laion's CLIP-ViT-H-14 is
published in both layouts): the open_clip package needs torchvision, which has no release for every torch. The
renames below follow open_clip's module names; q, k and v come out of open_clip's fused in_proj, and the two
projections are stored transposed. Images go through HPSv2's evaluation transform (longest side to 224, zero
padding to a square: hps_preprocess); prompts through the CLIP BPE tokenizer of a local CLIP-ViT-H-14 folder (the
--pickscore-processor folder serves), 77 tokens, pooled at the end-of-text token.
"""
from __future__ import annotations

import numpy as np
import torch

from cgkernels.scorers.common import CLIP_MEAN, CLIP_STD, Scorer, fingerprint, load_state_dict, require_path

# open_clip's architecture constants that the state dict does not show: attention head width (vision) and head
# count (text). ViT-H-14: vision 1280 wide in 80-wide heads (16), text 1024 wide in 16 heads, GELU.
ARCHITECTURES = {"ViT-H-14": {"vision_head_width": 80, "text_heads": 16, "hidden_act": "gelu"}}


def _layer_renames(prefix: str, target: str, state: dict) -> dict:
    """open_clip's residual blocks under `prefix` as transformers' CLIPEncoderLayer weights under `target`."""
    out = {}
    blocks = sorted({int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix)})
    for i in blocks:
        src, dst = f"{prefix}{i}.", f"{target}{i}."
        for role, tensor in zip(("q_proj", "k_proj", "v_proj"), state[src + "attn.in_proj_weight"].chunk(3)):
            out[f"{dst}self_attn.{role}.weight"] = tensor
        for role, tensor in zip(("q_proj", "k_proj", "v_proj"), state[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{role}.bias"] = tensor
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{dst}{new}.weight"] = state[f"{src}{old}.weight"]
            out[f"{dst}{new}.bias"] = state[f"{src}{old}.bias"]
    return out


def convert_open_clip_state(state: dict) -> dict:
    """An open_clip CLIP state dict (ViT image tower, text transformer) as transformers' CLIPModel state dict."""
    state = {k.removeprefix("module."): v for k, v in state.items()}  # a DDP-saved checkpoint
    required = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection", "logit_scale")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"not an open_clip CLIP state dict (missing {', '.join(missing)})")
    out = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # (sic: transformers' name)
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].T.contiguous(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].T.contiguous(),
        "logit_scale": state["logit_scale"],
    }
    out.update(_layer_renames("visual.transformer.resblocks.", "vision_model.encoder.layers.", state))
    out.update(_layer_renames("transformer.resblocks.", "text_model.encoder.layers.", state))
    return out


def clip_config(state: dict, architecture: str, tokenizer):
    """transformers' CLIPConfig for a converted open_clip state dict (sizes read off the tensors)."""
    from transformers import CLIPConfig

    constants = ARCHITECTURES[architecture]
    vision_width = state["vision_model.embeddings.class_embedding"].shape[0]
    patch = state["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = int(round((state["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5))
    text_positions, text_width = state["text_model.embeddings.position_embedding.weight"].shape
    count = lambda prefix: len({k.split(".")[3] for k in state if k.startswith(prefix)})  # noqa: E731
    return CLIPConfig(
        vision_config=dict(hidden_size=vision_width, image_size=grid * patch, patch_size=patch,
                           intermediate_size=state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                           num_hidden_layers=count("vision_model.encoder.layers."),
                           num_attention_heads=vision_width // constants["vision_head_width"],
                           hidden_act=constants["hidden_act"], layer_norm_eps=1e-5),
        text_config=dict(hidden_size=text_width, max_position_embeddings=text_positions,
                         vocab_size=state["text_model.embeddings.token_embedding.weight"].shape[0],
                         intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                         num_hidden_layers=count("text_model.encoder.layers."),
                         num_attention_heads=constants["text_heads"], hidden_act=constants["hidden_act"],
                         layer_norm_eps=1e-5, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        projection_dim=state["visual_projection.weight"].shape[0],
    )


def hps_preprocess(image, side: int = 224) -> torch.Tensor:
    """HPSv2's evaluation transform (its open_clip fork, resize_longest_max=True): the image as a [0, 1] tensor,
    the longest side resized to `side` (the other rounded; bicubic on the tensor, antialiased as torchvision >= 0.17
    does), zero padding centred to side x side, OpenAI CLIP mean/std. Unlike CLIP's resize + centre crop, nothing is
    cut off; for square images the two agree up to the resampling filter."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = side / max(height, width)
    if scale != 1.0:  # (as HPSv2: an image whose longest side is already `side` is left as it is)
        size = (round(height * scale), round(width * scale))
        pixels = torch.nn.functional.interpolate(pixels[None], size=size, mode="bicubic", align_corners=False,
                                                 antialias=True)[0]
        pad_h, pad_w = side - size[0], side - size[1]
        pixels = torch.nn.functional.pad(pixels, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


class HPSv2(Scorer):
    name = "hpsv2"

    def __init__(self, checkpoint_path, tokenizer_path=None, device: str = "cpu", architecture: str = "ViT-H-14"):
        checkpoint_path = require_path(checkpoint_path, self.name, "checkpoint",
                                       "the HPSv2 checkpoint (HPS_v2.1_compressed.pt)")
        tokenizer_path = require_path(tokenizer_path, self.name, "tokenizer",
                                      "a CLIP-ViT-H-14 tokenizer folder (e.g. the --pickscore-processor folder)")
        import transformers

        self.tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
        state = convert_open_clip_state(load_state_dict(checkpoint_path))
        self.device = device
        self.model = transformers.CLIPModel(clip_config(state, architecture, self.tokenizer))
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("position_ids")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{checkpoint_path}: does not fit open_clip's {architecture} (missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]})")
        self.model.eval().to(device)
        self.side = self.model.config.vision_config.image_size
        self.context = self.model.config.text_config.max_position_embeddings
        self.fingerprint = fingerprint(self.name, checkpoint_path, tokenizer_path)

    def pixel_values(self, images) -> torch.Tensor:
        return torch.stack([hps_preprocess(image, self.side) for image in images])

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        pixels = self.pixel_values(images).to(self.device)
        image_embeds = self.model.get_image_features(pixel_values=pixels)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=self.context,
                                return_tensors="pt").to(self.device)
        text_embeds = self.model.get_text_features(**tokens)
        image_embeds, text_embeds = (e if torch.is_tensor(e) else e.pooler_output for e in (image_embeds, text_embeds))
        image_embeds = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
        text_embeds = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
        return (image_embeds * text_embeds).sum(-1).float().cpu().numpy()

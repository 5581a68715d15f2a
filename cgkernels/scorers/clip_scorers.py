"""The CLIP-based scorers, on transformers' CLIPModel + CLIPProcessor folders (the layout PickScore_v1 and
openai/clip-vit-large-patch14 are published in).

PickScore (Kirstain et al. 2023): logit_scale * cos(image embedding, prompt embedding) of the PickScore_v1
CLIP-H/14, images and text through the CLIP-ViT-H-14 processor. LAION aesthetic predictor v2: an MLP over the
L2-normalised CLIP ViT-L/14 image embedding, images pre-processed as OpenAI's clip.load does (torchvision's
resize and centre crop, whose crop offset rounds where the transformers processor's floors).
"""
from __future__ import annotations

import numpy as np
import torch

from cgkernels.scorers.common import (
    Scorer, clip_preprocess, fingerprint, load_state_dict, require_path,
)


def _projected(features):
    # transformers >= 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor.
    return features if torch.is_tensor(features) else features.pooler_output


class _ClipFolder:
    """A CLIPModel and its processor from local folders, checked to agree on the input resolution."""

    def __init__(self, scorer: str, model_path, processor_path, device: str):
        import transformers

        self.device = device
        self.model = transformers.CLIPModel.from_pretrained(str(model_path), local_files_only=True).eval().to(device)
        self.processor = transformers.CLIPProcessor.from_pretrained(str(processor_path), local_files_only=True)
        crop = self.processor.image_processor.crop_size
        side = self.model.config.vision_config.image_size
        if (crop["height"], crop["width"]) != (side, side):
            raise ValueError(f"{processor_path}: the processor crops to {crop['height']}x{crop['width']} but the "
                             f"model {model_path} takes {side}x{side} images")

    def processor_pixels(self, images) -> torch.Tensor:
        """The processor's pre-processing: RGB, resize the short side (bicubic), centre crop, CLIP normalisation."""
        rgb = [image.convert("RGB") for image in images]
        return self.processor(images=rgb, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.model.dtype)
        embeds = _projected(self.model.get_image_features(pixel_values=pixels))
        return embeds / embeds.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeddings(self, prompts) -> torch.Tensor:
        max_length = self.model.config.text_config.max_position_embeddings
        tokens = self.processor(text=list(prompts), padding=True, truncation=True, max_length=max_length,
                                return_tensors="pt").to(self.device)
        embeds = _projected(self.model.get_text_features(**tokens))
        return embeds / embeds.norm(dim=-1, keepdim=True)


class PickScore(Scorer):
    name = "pickscore"

    def __init__(self, model_path, processor_path=None, device: str = "cpu"):
        model_path = require_path(model_path, self.name, "model", "the PickScore model folder (PickScore_v1)")
        processor_path = require_path(processor_path or model_path, self.name, "processor",
                                      "the PickScore processor folder (CLIP-ViT-H-14-laion2B-s32B-b79K)")
        self.clip = _ClipFolder(self.name, model_path, processor_path, device)
        self.fingerprint = fingerprint(self.name, model_path, processor_path)

    def pixel_values(self, images) -> torch.Tensor:
        return self.clip.processor_pixels(images)  # PickScore was published with the transformers processor

    def __call__(self, images, prompts) -> np.ndarray:
        image_embeds = self.clip.image_embeddings(self.pixel_values(images))
        text_embeds = self.clip.text_embeddings(prompts)
        scale = self.clip.model.logit_scale.detach().exp()
        return (scale * (image_embeds * text_embeds).sum(-1)).float().cpu().numpy()


class AestheticHead(torch.nn.Module):
    """The LAION aesthetic predictor v2 MLP as released: `layers` = Linear(768, 1024), Dropout, Linear(1024, 128),
    Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1), no activations. Built from the shapes in the
    state dict (keys layers.<index>.weight/bias), so the indices of the dropouts between them are kept."""

    def __init__(self, state: dict):
        super().__init__()
        indices = sorted({int(key.split(".")[1]) for key in state if key.startswith("layers.")})
        if not indices:
            raise ValueError("aesthetic head weights have no 'layers.N.weight' entries (expected the LAION MLP)")
        modules = [torch.nn.Identity() for _ in range(indices[-1] + 1)]  # Identity = the dropouts at eval time
        for index in indices:
            out_features, in_features = state[f"layers.{index}.weight"].shape
            modules[index] = torch.nn.Linear(in_features, out_features)
        self.layers = torch.nn.Sequential(*modules)
        self.in_features = modules[indices[0]].in_features
        self.load_state_dict(state)
        self.eval()

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)


class AestheticScore(Scorer):
    name = "aesthetic"

    def __init__(self, clip_path, head_path, device: str = "cpu"):
        clip_path = require_path(clip_path, self.name, "clip", "the CLIP ViT-L/14 folder (clip-vit-large-patch14)")
        head_path = require_path(head_path, self.name, "head",
                                 "the aesthetic predictor weights (sac+logos+ava1-l14-linearMSE.pth)")
        self.clip = _ClipFolder(self.name, clip_path, clip_path, device)
        self.head = AestheticHead(load_state_dict(head_path)).to(device)
        embed_dim = self.clip.model.config.projection_dim
        if self.head.in_features != embed_dim:
            raise ValueError(f"{head_path}: the MLP takes {self.head.in_features}-d embeddings, the CLIP "
                             f"model {clip_path} gives {embed_dim}-d (the LAION head goes with ViT-L/14)")
        self.fingerprint = fingerprint(self.name, clip_path, head_path)

    def pixel_values(self, images) -> torch.Tensor:
        # The predictor was fit on embeddings from OpenAI's clip.load pre-processing (torchvision's).
        side = self.clip.model.config.vision_config.image_size
        return torch.stack([clip_preprocess(image, side) for image in images])

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        embeds = self.clip.image_embeddings(self.pixel_values(images)).float()
        return self.head(embeds).cpu().numpy()

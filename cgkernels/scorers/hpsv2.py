"""HPS v2 / v2.1 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences; the published checkpoints
(HPS_v2_compressed.pt, HPS_v2.1_compressed.pt) hold {"state_dict": open_clip state dict}. Score = cos(image
embedding, prompt embedding), images through open_clip's ViT-H-14 evaluation transform.

Needs open_clip_torch, which needs torchvision (`pip install 'cgkernels[eval]'`).
"""
from __future__ import annotations

import numpy as np
import torch

from cgkernels.scorers.common import Scorer, fingerprint, load_state_dict, require_package, require_path

ARCHITECTURE = "ViT-H-14"


class HPSv2(Scorer):
    name = "hpsv2"

    def __init__(self, checkpoint_path, device: str = "cpu", architecture: str = ARCHITECTURE):
        checkpoint_path = require_path(checkpoint_path, self.name, "checkpoint",
                                       "the HPSv2 checkpoint (HPS_v2.1_compressed.pt)")
        open_clip = require_package("open_clip", self.name, "open_clip_torch")
        self.device = device
        # pretrained=None: the architecture only; every weight comes from the checkpoint below.
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(architecture, pretrained=None,
                                                                               device=device)
        state = load_state_dict(checkpoint_path)
        state = {k.removeprefix("module."): v for k, v in state.items()}  # a DDP-saved checkpoint
        self.model.load_state_dict(state)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(architecture)
        self.fingerprint = fingerprint(self.name, checkpoint_path)

    def pixel_values(self, images) -> torch.Tensor:
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images])

    @torch.no_grad()
    def __call__(self, images, prompts) -> np.ndarray:
        image_embeds = self.model.encode_image(self.pixel_values(images).to(self.device), normalize=True)
        text_embeds = self.model.encode_text(self.tokenizer(list(prompts)).to(self.device), normalize=True)
        return (image_embeds * text_embeds).sum(-1).float().cpu().numpy()

"""ImageReward v1.0 (Xu et al. 2023): BLIP (ViT-L image encoder, BERT text encoder with cross-attention) and an MLP
head, as the `image-reward` package builds it: ImageReward.pt is that module's state dict (keys blip.* and
mlp.layers.*), med_config.json the BERT config. The score is the package's `score`: the MLP over the [CLS] state
of the prompt cross-attending to the image, standardised by the published mean and std.

Needs the `image-reward` package (which needs torchvision, timm and fairscale), and its BLIP reads the
bert-base-uncased tokenizer from the local Hugging Face cache.
"""
from __future__ import annotations

import numpy as np

from cgkernels.scorers.common import Scorer, fingerprint, load_state_dict, require_package, require_path


class ImageRewardScore(Scorer):
    name = "imagereward"

    def __init__(self, checkpoint_path, med_config_path, device: str = "cpu"):
        checkpoint_path = require_path(checkpoint_path, self.name, "checkpoint",
                                       "the ImageReward checkpoint (ImageReward.pt)")
        med_config_path = require_path(med_config_path, self.name, "med_config", "ImageReward's med_config.json")
        module = require_package("ImageReward.ImageReward", self.name, "image-reward")
        self.model = module.ImageReward(med_config=str(med_config_path), device=device).to(device)
        missing, unexpected = self.model.load_state_dict(load_state_dict(checkpoint_path), strict=False)
        # The package loads non-strictly (the text encoder's position_ids buffer differs across transformers
        # versions); anything else missing means a wrong file.
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{checkpoint_path} is not an ImageReward checkpoint: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        self.model.eval()
        self.fingerprint = fingerprint(self.name, checkpoint_path, med_config_path)

    def __call__(self, images, prompts) -> np.ndarray:
        scores = [self.model.score(prompt, [image.convert("RGB")]) for image, prompt in zip(images, prompts)]
        return np.asarray(scores, dtype=float).reshape(len(images))

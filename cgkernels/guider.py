"""`ContrastiveGuidance`: the same guidance modes as `cgkernels.patch`, as a diffusers guider for Modular Diffusers.

Modular pipelines call the denoiser once per guider batch, so here the branches run SEQUENTIALLY (one UNet call per
branch, the adapter mix switched in `prepare_models`); only the final merge is fused (`guidance_merge`). For the
one-pass path (all branches in one batched UNet call through the segmented multi-LoRA layers) use a regular
`StableDiffusionPipeline` / `StableDiffusionXLPipeline` with `cgkernels.patch(pipe, ...)`.

Modes: contrastive, contrastive-cond, contrastive-uncond, pgd, npo, cfg ("merged" is a weight-space mode and needs the patch).
"""
from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput

from cgkernels.guidance import (
    ACTIVE_ADAPTERS,
    COND,
    UNCOND,
    Guidance,
    GuidanceConfig,
    branch,
    compile_merge,
    is_guided_step,
)
from cgkernels.lora_layers import adapter_scaling, lora_layers
from cgkernels.ops import guidance_merge

__all__ = ["ContrastiveGuidance"]

_MAX_BRANCHES = 6


class ContrastiveGuidance(BaseGuidance):
    """Preference guidance (cPGD / PGD / Diffusion-NPO) over LoRA adapters loaded on the denoiser.

    Args:
        mode: "contrastive" | "contrastive-cond" | "pgd" | "npo" | "cfg" (see `cgkernels.guidance`).
        positive, negative: adapter names loaded on the denoiser (peft, e.g. via load_lora_weights).
        strength: s; merge_weight: NPO's weight of the positive adapter in the unconditional branch is 1 - merge_weight.
        guidance_scale, guidance_rescale: as in ClassifierFreeGuidance (rescale reference: the mode's conditional
            prediction).
        start, stop: fractions of the steps with preference guidance; other steps are plain base-model CFG.
    """

    _input_predictions = [f"pred_branch_{i}" for i in range(_MAX_BRANCHES)]

    @register_to_config
    def __init__(
        self,
        mode: str = "contrastive",
        positive: str | None = "pos",
        negative: str | None = "neg",
        strength: float = 1.0,
        merge_weight: float = 0.0,
        guidance_scale: float = 7.5,
        guidance_rescale: float = 0.0,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
    ):
        super().__init__(start, stop, enabled)
        if mode == "merged":
            raise ValueError("mode='merged' changes the layers' weights; use cgkernels.patch(pipe, guidance='merged')")
        self.guidance = GuidanceConfig(mode, positive, negative, strength, start, stop, merge_weight).validate()
        self.guidance_scale = guidance_scale
        self.guidance_rescale = guidance_rescale
        self.preset = self.guidance.guidance()
        self.base = Guidance(branch(UNCOND), branch(COND), name="base")
        self._saved_layers = None

    # -- which branches run this step ----------------------------------------------------------------------------
    def _cfg_active(self) -> bool:
        return not math.isclose(self.guidance_scale, 1.0)

    def _preference_active(self) -> bool:
        if not self._enabled:
            return False
        if self._num_inference_steps is None:
            return True
        return is_guided_step(self._step, self._num_inference_steps, self._start, self._stop)

    def _plan(self) -> tuple[tuple, tuple, tuple]:
        """(branches, coeffs, ref_coeffs) of this step (cgkernels.guidance.compile_merge)."""
        guidance = self.preset if self._preference_active() else self.base
        return compile_merge(guidance, "cfg" if self._cfg_active() else "cond", self.guidance_scale)

    @property
    def num_conditions(self) -> int:
        return len(self._plan()[0])

    @property
    def is_conditional(self) -> bool:
        index = max(self._count_prepared - 1, 0)
        return self._plan()[0][index].prompt == COND

    # -- inputs ----------------------------------------------------------------------------------------------------
    def prepare_inputs(self, data):
        return [
            self._prepare_batch(data, 0 if branch.prompt == COND else 1, self._input_predictions[i])
            for i, branch in enumerate(self._plan()[0])
        ]

    def prepare_inputs_from_block_state(self, data, input_fields):
        return [
            self._prepare_batch_from_block_state(
                input_fields, data, 0 if branch.prompt == COND else 1, self._input_predictions[i]
            )
            for i, branch in enumerate(self._plan()[0])
        ]

    # -- adapters per branch ---------------------------------------------------------------------------------------
    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        weights = dict(self._plan()[0][self._count_prepared - 1].adapters)
        if ACTIVE_ADAPTERS in weights:
            return  # mode "cfg": the adapters the user activated
        layers = [layer for _, layer in lora_layers(denoiser)]
        self._saved_layers = [
            (layer, dict(layer.scaling), list(layer.active_adapters), layer.disable_adapters) for layer in layers
        ]
        for layer in layers:
            present = [a for a in weights if a in layer.lora_A]
            for adapter in present:  # the configured scale, as the one-pass patch uses (not set_adapters weights)
                layer.scaling[adapter] = adapter_scaling(layer, adapter) * weights[adapter]
            # set peft's flags directly: set_adapter would also toggle requires_grad
            layer._active_adapter = present
            layer._disable_adapters = not present

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._saved_layers is None:
            return
        for layer, scaling, active, disabled in self._saved_layers:
            layer.scaling.clear()
            layer.scaling.update(scaling)
            layer._active_adapter = active
            layer._disable_adapters = disabled
        self._saved_layers = None

    # -- merge -----------------------------------------------------------------------------------------------------
    def forward(self, **predictions: torch.Tensor) -> GuiderOutput:
        branches, coeffs, ref_coeffs = self._plan()
        preds = [predictions[self._input_predictions[i]] for i in range(len(branches))]
        rescale = self.guidance_rescale if self._cfg_active() else 0.0
        pred = guidance_merge(preds, list(coeffs), rescale=rescale, ref_coeffs=list(ref_coeffs))
        pred_cond = guidance_merge(preds, list(ref_coeffs))
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=None)

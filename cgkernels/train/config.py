"""Training configuration: one small dataclass mirroring the command line of python/train.py."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

OBJECTIVES = ("sft", "sft-pos", "dpo", "npo", "dpo+npo")
DATASET_FORMATS = ("pickapic", "hpdv3", "jsonl")
MIXED_PRECISION = ("no", "fp16", "bf16")
BATCHING = ("joint", "separate")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "sigma_sqrt", "cosmap", "none")  # diffusers.training_utils' schemes

# Which adapters each objective trains: sft trains both cPGD modules, sft-pos only the positive one (supervised
# fine-tuning on the preferred images alone, at half sft's cost), dpo the PGD positive module, npo the
# Diffusion-NPO negative module, dpo+npo both preference modules against one shared reference pass.
OBJECTIVE_ADAPTERS = {"sft": ("pos", "neg"), "sft-pos": ("pos",), "dpo": ("pos",), "npo": ("neg",),
                      "dpo+npo": ("pos", "neg")}
SFT_OBJECTIVES = ("sft", "sft-pos")


@dataclass
class TrainConfig:
    model: str
    dataset: str
    output_dir: str = "outputs/train"
    dataset_format: str = "pickapic"
    image_root: Optional[str] = None  # hpdv3/jsonl image folder; default: the dataset file's folder
    objective: str = "sft"

    # LoRA (peft): alpha defaults to rank (scale 1.0).
    rank: int = 8
    alpha: Optional[float] = None
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    # Optimisation.
    lr: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    batch_size: int = 1  # preference pairs per process per micro-step
    grad_accum: int = 1
    max_steps: int = 1000  # optimizer steps
    beta: float = 5000.0  # Diffusion-DPO's beta
    # Share of pairs trained on CFG's unconditional branch as the pipeline builds it; None: 0.2 for sft, else 0.0.
    empty_prompt_prob: Optional[float] = None

    # Flow matching (SD3, Flux only; None = the diffusers training scripts' / pipelines' default, and setting any
    # of them for a UNet model is an error). Sigma sampling and loss weighting: logit_normal (SD3's default),
    # mode, none (uniform sigmas, weight 1; Flux's default), sigma_sqrt, cosmap (uniform sigmas, weighted).
    weighting_scheme: Optional[str] = None
    logit_mean: Optional[float] = None  # logit_normal: 0.0
    logit_std: Optional[float] = None  # logit_normal: 1.0
    mode_scale: Optional[float] = None  # mode: 1.29
    guidance_scale: Optional[float] = None  # guidance-distilled Flux (FLUX.1-dev): the guidance input, 3.5
    max_sequence_length: Optional[int] = None  # T5 tokens: SD3 256, Flux 512 (the pipelines' defaults)

    # Data and preprocessing (as Diffusion-DPO: resize shortest side, crop, optional flip).
    resolution: int = 512
    random_crop: bool = False
    random_flip: bool = True
    keep_ties: bool = False
    shuffle: bool = True
    cache_latents: bool = False
    latent_cache_dir: Optional[str] = None  # default OUT/latent_cache

    # Runtime.
    seed: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    batching: str = "joint"  # "separate": one UNet call per adapter and per reference (debugging, benchmarks)
    checkpoint_every: int = 500  # optimizer steps; 0 disables checkpoints
    checkpoints_to_keep: int = 2  # newest checkpoints kept; 0 keeps all
    resume: bool = False  # continue from the newest checkpoint under OUT/checkpoints
    tensorboard: bool = False
    progress: bool = True

    @property
    def adapters(self) -> tuple[str, ...]:
        return OBJECTIVE_ADAPTERS[self.objective]

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def prompt_dropout(self) -> float:
        if self.empty_prompt_prob is not None:
            return self.empty_prompt_prob
        return 0.2 if self.objective in SFT_OBJECTIVES else 0.0

    def validate(self) -> None:
        """Raise a ValueError naming the first bad option, before anything is loaded."""
        _choice("objective", self.objective, OBJECTIVES)
        _choice("dataset_format", self.dataset_format, DATASET_FORMATS)
        _choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        _choice("batching", self.batching, BATCHING)
        for name in ("rank", "batch_size", "grad_accum", "max_steps", "resolution"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("checkpoint_every", "lr_warmup_steps", "checkpoints_to_keep"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0.0 <= self.prompt_dropout <= 1.0:
            raise ValueError(f"empty_prompt_prob must be in [0, 1], got {self.empty_prompt_prob}")
        from diffusers.optimization import SchedulerType

        _choice("lr_scheduler", self.lr_scheduler, tuple(t.value for t in SchedulerType))
        if self.weighting_scheme is not None:
            _choice("weighting_scheme", self.weighting_scheme, WEIGHTING_SCHEMES)
        if self.logit_std is not None and not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {self.logit_std}")
        if self.max_sequence_length is not None and int(self.max_sequence_length) <= 0:
            raise ValueError(f"max_sequence_length must be > 0, got {self.max_sequence_length}")
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")

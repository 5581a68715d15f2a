r"""Train preference adapters for cgkernels guidance (SFT pos/neg for cPGD, DPO for PGD, NPO, DPO+NPO).

    python python/train.py --model DIR_OR_HUB_ID --dataset PATH --dataset-format pickapic|hpdv3|jsonl \
        --objective sft|sft-pos|dpo|npo|dpo+npo --output-dir OUT [--rank 8 --lr 1e-4 --batch-size 1 --grad-accum 1 \
        --max-steps 1000 --resolution 512 --seed 0 --resume --mixed-precision bf16 --cache-latents ...]

Many GPUs / machines: `accelerate launch [--num_processes N] python/train.py ...` (or torchrun). Every option of
cgkernels.train.TrainConfig is a flag (underscores become dashes); see --help.
"""
import argparse
import dataclasses
import json
import os

from cgkernels.cli import HelpFormatter
from cgkernels.train import TrainConfig, train
from cgkernels.train.config import BATCHING, DATASET_FORMATS, MIXED_PRECISION, OBJECTIVES, WEIGHTING_SCHEMES

HELP = {
    "model": "diffusers pipeline folder (unet/ or an SD3/Flux transformer/, vae/, text_encoder/, tokenizer/, "
             "scheduler/) or a hub id",
    "weighting_scheme": "SD3/Flux only: sigma sampling and loss weighting (default: logit_normal for SD3, none for "
                        "Flux, as diffusers' training scripts)",
    "guidance_scale": "guidance-distilled Flux only: the guidance input while training (default 3.5)",
    "max_sequence_length": "SD3/Flux only: T5 prompt tokens (default: the pipeline's, SD3 256, Flux 512)",
    "dataset": "Pick-a-Pic parquet file or folder of shards (a train-*/test-* split layout uses train-* only), "
               "HPDv3 JSON (or its folder), or JSONL",
    "image_root": "folder that hpdv3/jsonl image paths are relative to (default: the dataset file's folder)",
    "objective": "sft: pos learns winners, neg losers; sft-pos: pos alone learns winners; dpo: pos by Diffusion-DPO; npo: neg by Diffusion-NPO",
    "batch_size": "preference pairs per process per micro-step",
    "beta": "Diffusion-DPO beta",
    "empty_prompt_prob": "share of pairs trained on the pipeline's unconditional branch (the encoded empty prompt, or "
                         "zeros for SDXL with force_zeros_for_empty_prompt); default 0.2 for sft and sft-pos, 0 otherwise",
    "resume": "continue from the newest checkpoint in OUTPUT_DIR/checkpoints",
    "checkpoint_every": "optimizer steps between checkpoints (0: none)",
    "checkpoints_to_keep": "newest checkpoints kept (0: all)",
    "batching": "joint: one UNet pass for all adapters; separate: one call per adapter (reference path)",
    "output_dir": "where the adapters (OUT/pos, OUT/neg), checkpoints and logs go",
    "dataset_format": "pickapic: parquet shards; hpdv3: HPDv3 JSON; jsonl: one JSON pair per line",
    "rank": "LoRA rank",
    "alpha": "LoRA alpha (default: the rank, i.e. scale 1)",
    "target_modules": "module names that get LoRA layers",
    "lr": "learning rate",
    "lr_scheduler": "diffusers learning-rate schedule name",
    "lr_warmup_steps": "warm-up optimizer steps",
    "adam_beta1": "AdamW beta1",
    "adam_beta2": "AdamW beta2",
    "adam_weight_decay": "AdamW weight decay",
    "adam_epsilon": "AdamW epsilon",
    "use_8bit_adam": "bitsandbytes 8-bit AdamW",
    "max_grad_norm": "gradient clipping norm",
    "grad_accum": "micro-steps per optimizer step",
    "max_steps": "optimizer steps to train",
    "logit_mean": "logit_normal sigma sampling: mean (default 0.0)",
    "logit_std": "logit_normal sigma sampling: std (default 1.0)",
    "mode_scale": "mode sigma sampling: scale (default 1.29)",
    "resolution": "training image side (shortest side resized, then cropped)",
    "random_crop": "random instead of centre crops",
    "random_flip": "random horizontal flips",
    "keep_ties": "keep pairs labelled as ties",
    "shuffle": "shuffle the pairs",
    "cache_latents": "encode every image once with the VAE and train from the cached latents",
    "latent_cache_dir": "latent cache folder (default: OUTPUT_DIR/latent_cache)",
    "seed": "random seed",
    "mixed_precision": "autocast precision",
    "gradient_checkpointing": "recompute activations in the backward pass (less memory)",
    "tensorboard": "log to OUTPUT_DIR/logs for TensorBoard",
    "progress": "show a progress bar",
}
# Each format's usual file types: a dataset whose suffix says another format is refused before anything loads.
FORMAT_SUFFIXES = {"pickapic": (".parquet",), "hpdv3": (".json",), "jsonl": (".jsonl",)}
CHOICES = {"objective": OBJECTIVES, "dataset_format": DATASET_FORMATS, "mixed_precision": MIXED_PRECISION,
           "batching": BATCHING, "weighting_scheme": WEIGHTING_SCHEMES}


def _value_type(field: dataclasses.Field):
    annotation = str(field.type)
    for name, kind in (("float", float), ("int", int)):
        if name in annotation:
            return kind
    return str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        options = {"help": HELP.get(field.name), "dest": field.name}
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, type=_value_type(field), **options)
        elif isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, **options)
        elif isinstance(field.default, tuple):
            parser.add_argument(flag, nargs="+", default=list(field.default), **options)
        else:
            parser.add_argument(flag, type=_value_type(field), default=field.default,
                                choices=CHOICES.get(field.name), **options)
    return parser


def check_dataset_format(dataset: str, dataset_format: str) -> None:
    """A dataset file whose suffix belongs to another format: name the flag rather than fail inside the reader."""
    suffix = os.path.splitext(dataset)[1].lower()
    if not os.path.isfile(dataset) or suffix in FORMAT_SUFFIXES[dataset_format]:
        return
    for other, suffixes in FORMAT_SUFFIXES.items():
        if suffix in suffixes:
            raise ValueError(f"--dataset {dataset} is a {suffix} file but --dataset-format is {dataset_format}: "
                             f"pass --dataset-format {other}")


def main(argv=None) -> dict:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    args["target_modules"] = tuple(args["target_modules"])
    try:
        check_dataset_format(args["dataset"], args["dataset_format"])
        TrainConfig(**args).validate()
    except ValueError as error:
        parser.error(str(error))
    result = train(TrainConfig(**args))
    if os.environ.get("RANK", "0") == "0":
        summary = {k: v for k, v in result.items() if k != "losses"}
        print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()

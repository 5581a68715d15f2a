r"""Sample images with preference guidance (cPGD, PGD, Diffusion-NPO): prompts x seeds x methods x strengths,
batched, resumable (a rerun skips the images that exist), on one process or many.

Example (a baseline and a strength sweep of contrastive guidance, 4 seeds per prompt, from one pipeline load):
    python python/sample.py --model DIR --positive pos_lora/ --negative neg_lora/ \
        --guidance cfg,contrastive --sweep 0.5,1,2 --prompts prompts.txt --seeds 0-3 --batch-size 8 \
        --steps 30 --out outputs/samples

On N GPUs (each process samples a contiguous shard of the (method, strength, prompt, seed) list):
    accelerate launch --multi_gpu --num_processes N python/sample.py ...same options...

Output: OUT/<method>_s<strength>_p<prompt index>_seed<seed>.png, each with a .json sidecar (prompt, seed, method,
strength, settings), and OUT/grids/<method>_sweep.png for a sweep. "cfg" is the base model with plain CFG (its
adapters off), sampled once whatever the strengths. python/evaluate.py reads OUT as it is.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgkernels.cli import HelpFormatter  # noqa: E402
from cgkernels.guidance import MODES  # noqa: E402
from cgkernels.sampling import SampleConfig, parse_seeds, parse_strengths, read_prompts, sample  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="diffusers pipeline folder (or a hub id in the local cache)")
    p.add_argument("--positive", help="positive LoRA (file or folder); needed by contrastive*, merged, pgd")
    p.add_argument("--negative", help="negative LoRA (file or folder); needed by contrastive*, merged, npo")
    p.add_argument("--guidance", default="contrastive",
                   help=f"guidance mode, or several comma-separated (one pipeline load): {', '.join(MODES)}")
    strength = p.add_mutually_exclusive_group()
    strength.add_argument("--strength", type=float, default=1.0, help="guidance strength s")
    strength.add_argument("--sweep", help="comma-separated strengths, e.g. 0,1,2,4 (also writes OUT/grids/)")
    p.add_argument("--start", type=float, default=0.0, help="guided window start, as a fraction of the steps")
    p.add_argument("--stop", type=float, default=1.0, help="guided window end, as a fraction of the steps")
    p.add_argument("--merge-weight", type=float, default=0.0, help="npo only: weight of the positive in the merge")
    prompts = p.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", help="prompt file: .txt (one per line), .jsonl ({\"prompt\": ...} per line) "
                                           "or .tsv with a Prompt column (PartiPrompts)")
    p.add_argument("--negative-prompt", help="negative prompt for every image")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale g")
    p.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale phi (UNet pipelines)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--seeds", default="0", help="seeds for every prompt: 0,1,2,3 or a range 0-99 (inclusive)")
    p.add_argument("--batch-size", type=int, default=1, help="images per pipeline call")
    p.add_argument("--height", type=int, help="image height (default: the pipeline's)")
    p.add_argument("--width", type=int, help="image width (default: the pipeline's)")
    p.add_argument("--max-sequence-length", type=int, help="SD3/Flux T5 tokens (default: the pipeline's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model dtype")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu; per process under "
                                    "accelerate launch)")
    p.add_argument("--out", default="outputs/samples", help="output folder (reruns resume into it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def config_from_args(args, parser) -> SampleConfig:
    """The run's config, with every input problem reported against its flag before any model loads."""
    try:
        prompt_list = read_prompts(args.prompts) if args.prompts else args.prompt
    except (ValueError, OSError) as error:
        parser.error(f"--prompts: {error}")
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as error:
        parser.error(f"--seeds: {error}")
    try:
        strengths = parse_strengths(args.sweep) if args.sweep else [args.strength]
    except ValueError as error:
        parser.error(f"--sweep: {error}")
    config = SampleConfig(
        model=args.model, prompts=prompt_list, out=args.out, positive=args.positive, negative=args.negative,
        methods=[m.strip() for m in args.guidance.split(",") if m.strip()], strengths=strengths, seeds=seeds,
        batch_size=args.batch_size, start=args.start, stop=args.stop, merge_weight=args.merge_weight,
        guidance_scale=args.guidance_scale, guidance_rescale=args.guidance_rescale,
        negative_prompt=args.negative_prompt, steps=args.steps, height=args.height, width=args.width,
        max_sequence_length=args.max_sequence_length, dtype=args.dtype, device=args.device,
    )
    try:
        config.validate()
    except (ValueError, OSError) as error:
        parser.error(str(error))
    return config


def main(argv=None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    config = config_from_args(args, parser)
    counts = sample(config, progress=not args.no_progress)
    who = f"rank {counts['rank']}: " if counts["processes"] > 1 else ""
    print(f"{who}wrote {counts['written']} images to {config.out} (skipped {counts['skipped']} that exist)")
    return counts


if __name__ == "__main__":
    main()

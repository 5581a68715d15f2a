r"""Score a method's images against a baseline's, paired by prompt and seed: a table of mean scores and win rates
with standard errors and paired bootstrap CIs (json + markdown) and a plot of win rate against strength.

Examples:
    python python/evaluate.py --images outputs/samples --baseline outputs/samples --baseline-method cfg \
        --scorer pickscore --pickscore-model models/PickScore_v1 \
        --pickscore-processor models/CLIP-ViT-H-14-laion2B-s32B-b79K --out outputs/eval

On N GPUs (the images still to score are split between the processes; scores are cached per image):
    accelerate launch --multi_gpu --num_processes N python/evaluate.py ...same options...

Weights are local paths only (nothing is downloaded); all scorers run on the core dependencies. The scorer
"taste" is the demo's reward and scores only captions of the demo world.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cgkernels.cli import HelpFormatter, distributed_state, process_device  # noqa: E402
from cgkernels.evaluate import evaluate, format_rows, plan_pairs, write_report  # noqa: E402
from cgkernels.scorers import PATH_OPTIONS, SCORERS, ScorerInputError, flag, make_scorer  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", required=True, help="the method's image folder (images + .json sidecars, or "
                                                   "metadata.jsonl); several methods / strengths: one row each")
    p.add_argument("--baseline", required=True, help="the baseline's image folder (may be the --images folder)")
    p.add_argument("--baseline-method", help="the baseline's method when its folder holds several (e.g. cfg)")
    p.add_argument("--baseline-strength", type=float, help="the baseline's strength when its folder holds several")
    p.add_argument("--scorer", action="append",
                   help=f"scorer, repeatable or comma-separated: {', '.join(SCORERS)} (default: taste, which "
                        "scores only the demo's captions)")
    for scorer, options in PATH_OPTIONS.items():
        for option, text in options.items():
            p.add_argument(flag(scorer, option), dest=f"{scorer}__{option}", metavar="PATH", help=text)
    p.add_argument("--device", help="torch device for the scorers (default: cuda if available, else cpu; per "
                                    "process under accelerate launch)")
    p.add_argument("--batch-size", type=int, default=16, help="images per scorer call")
    p.add_argument("--out", help="report folder: table.json, table.md, win_rate.png (default: IMAGES/eval)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> list:
    parser = build_parser()
    args = parser.parse_args(argv)
    names = [n.strip() for value in (args.scorer or ["taste"]) for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        parser.error(f"--scorer: unknown {', '.join(unknown)}; choose from {', '.join(SCORERS)}")
    if args.batch_size <= 0:
        parser.error(f"--batch-size must be positive, got {args.batch_size}")
    try:  # the folders first: no scorer loads for a run that cannot pair its images
        plan_pairs(args.images, args.baseline, args.baseline_method, args.baseline_strength)
    except (ValueError, OSError) as error:
        parser.error(f"--images/--baseline: {error}")

    state = distributed_state(args.device)
    device = process_device(args.device, state)
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    scorers = {}
    for name in dict.fromkeys(names):
        paths = {option: getattr(args, f"{name}__{option}") for option in PATH_OPTIONS[name]}
        try:
            scorers[name] = make_scorer(name, device=device, **paths)
        except (ValueError, OSError, ImportError) as error:
            parser.error(str(error))
    try:
        rows = evaluate(args.images, args.baseline, scorers, batch_size=args.batch_size,
                        baseline_method=args.baseline_method, baseline_strength=args.baseline_strength, state=state,
                        progress=not args.no_progress)
    except ScorerInputError as error:
        parser.error(str(error))
    if state is None or state.is_main_process:
        paths = write_report(rows, args.out or os.path.join(args.images, "eval"))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        print(format_rows(rows))
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()

"""Run the whole method end to end offline: python python/demo.py [--quick] [--out DIR] [--seed N]."""
import argparse
import os

# Before torch loads OpenMP: threads that sleep at a barrier instead of spinning. With the default (spinning) two
# threads on a CPU other processes keep busy ran 15x slower than one (measured on a loaded 2-core machine); passive,
# they run faster than one.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from cgkernels.demo.runner import config_for, run_demo  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run of every phase (CI)")
    parser.add_argument("--out", default="outputs/demo", help="report folder (cache in OUT/cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args()
    run_demo(config_for(args.quick, out=args.out, seed=args.seed), progress=not args.no_progress)


if __name__ == "__main__":
    main()

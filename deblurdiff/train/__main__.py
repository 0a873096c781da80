"""``python -m deblurdiff.train --config CONFIG [--set section.key=value ...]``

Several GPUs: ``accelerate launch -m deblurdiff.train --config CONFIG``.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deblurdiff.train",
        description="Train DeblurDiff's ControlNet and LKPN on a frozen Stable Diffusion 2.1.",
    )
    parser.add_argument(
        "--config", required=True, help="a .yaml/.yml, .json or .toml file (see configs/train_example.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a setting, e.g. --set training.max_steps=100 (value parsed as JSON when it can be); repeatable",
    )
    parser.add_argument("--output-dir", help="shorthand for --set output_dir=...")
    parser.add_argument(
        "--resume", help="shorthand for --set training.resume_from_checkpoint=... ('latest' or a folder)"
    )
    args = parser.parse_args(argv)

    from .config import load_config
    from .train import train

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    if args.resume:
        overrides.append(f"training.resume_from_checkpoint={args.resume}")
    try:
        config = load_config(args.config, overrides)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    train(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())

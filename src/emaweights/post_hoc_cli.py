"""``emaweights posthoc``: reconstruct a post-hoc EMA from saved snapshots.

emaweights posthoc SNAPSHOT_DIR --sigma-rel 0.05 --out weights.safetensors
"""

from __future__ import annotations

import argparse
import sys

from emaweights.post_hoc import _safetensors, reconstruct

__all__ = ["main"]


def main(argv: list[str]) -> int:
    """Parse ``argv``, reconstruct, write the weights; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="emaweights posthoc",
        description="Reconstruct the EMA of any sigma_rel from snapshots saved by PostHocEMA.",
    )
    parser.add_argument("snapshot_dir", help="directory holding manifest.json and the snapshots")
    parser.add_argument("--sigma-rel", type=float, required=True, help="profile width, e.g. 0.05")
    parser.add_argument("--out", required=True, help="output .safetensors file")
    parser.add_argument("--step", type=int, default=None, help="optimizer step (default: last)")
    args = parser.parse_args(argv)
    try:
        weights = reconstruct(args.snapshot_dir, args.sigma_rel, step=args.step)
    except (FileNotFoundError, ValueError) as err:
        print(f"emaweights posthoc: {err}", file=sys.stderr)
        return 2
    _safetensors().save_file({k: v.contiguous() for k, v in weights.items()}, args.out)
    print(f"wrote {len(weights)} tensors (sigma_rel={args.sigma_rel}) to {args.out}")
    return 0

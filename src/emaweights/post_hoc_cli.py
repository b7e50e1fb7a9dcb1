"""``emaweights posthoc``: reconstruct a post-hoc EMA from saved snapshots.

emaweights posthoc SNAPSHOT_DIR --sigma-rel 0.05 [--step S] [--out weights.safetensors]

Without ``--out`` the weights go to ``posthoc_sigma_rel<S>_step<N>.safetensors``
in the current directory; missing parent folders of ``--out`` are created. The
file is written atomically. Exit code 2 with a one-line message on any refusal.
"""

from __future__ import annotations

import argparse
import sys

from emaweights.io import save_safetensors
from emaweights.post_hoc import load_manifest, reconstruct

__all__ = ["default_out", "main"]


def default_out(sigma_rel: float, step: int) -> str:
    """The file name used when ``--out`` is not given."""
    return f"posthoc_sigma_rel{sigma_rel:g}_step{step}.safetensors"


def main(argv: list[str]) -> int:
    """Parse ``argv``, reconstruct, write the weights; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="emaweights posthoc",
        description="Reconstruct the EMA of any sigma_rel from snapshots saved by PostHocEMA.",
    )
    parser.add_argument("snapshot_dir", help="directory holding manifest.json and the snapshots")
    parser.add_argument("--sigma-rel", type=float, required=True, help="profile width, e.g. 0.05")
    parser.add_argument(
        "--out",
        default=None,
        help="output .safetensors file (parent folders are created; default: "
        "posthoc_sigma_rel<S>_step<N>.safetensors in the current directory)",
    )
    parser.add_argument(
        "--step", type=int, default=None, help="a snapshot step (default: the last snapshot's)"
    )
    args = parser.parse_args(argv)
    try:
        # OSError: an unreadable folder or file; ValueError covers LoadError.
        step = args.step
        if step is None:
            step = max(s["step"] for s in load_manifest(args.snapshot_dir)["snapshots"])
        weights = reconstruct(args.snapshot_dir, args.sigma_rel, step=step)
        out = args.out or default_out(args.sigma_rel, step)
        save_safetensors(weights, out)
    except (OSError, ValueError) as err:
        print(f"emaweights posthoc: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(weights)} tensors (sigma_rel={args.sigma_rel}, step {step}) to {out}")
    return 0

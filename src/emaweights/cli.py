"""The ``emaweights`` command: argument dispatch only.

Each sub-command lives in its own module with a ``main(argv) -> int``; this file
only maps names to them, imported on demand so ``emaweights --help`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# name -> ("module:function", one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench-speed": (
        "emaweights.bench.speed:main",
        "time the EMA update against roofline and anchors",
    ),
    "demo": (
        "emaweights.bench.demo:main",
        "fine-tune with and without an EMA and report forgetting",
    ),
    "posthoc": ("emaweights.post_hoc_cli:main", "reconstruct a post-hoc EMA from snapshots"),
}


def _usage() -> str:
    # The name column is as wide as the longest name, so no help text is pushed
    # out of line when a command is added.
    width = max(map(len, COMMANDS))
    lines = ["usage: emaweights [--version] COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `emaweights COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _version() -> str:
    from emaweights import __version__

    return f"emaweights {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch ``argv`` (default ``sys.argv[1:]``) to a sub-command; return its exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(_version())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"emaweights: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, func = COMMANDS[name][0].split(":")
    code: int = getattr(importlib.import_module(module), func)(rest)
    return code


if __name__ == "__main__":
    raise SystemExit(main())

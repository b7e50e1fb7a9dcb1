"""Fork server for the kill tests: forks writers that rewrite one file until killed.

Run as ``python -m tests.reliability._crash_writer``. It starts torch
single-threaded (a fork of a process with a running thread pool can hang), then
for each ``go KIND PATH K`` line on stdin forks a child writing counters K,
K+1, ... to PATH forever and prints its pid (the child prints ``first`` after its
first complete write, in either order); for each ``reap`` line it waits for
that child and prints its wait status.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch


def main() -> None:
    """Serve ``go KIND PATH K`` / ``reap`` commands on stdin."""
    torch.set_num_threads(1)
    from tests.reliability.test_crash import EMA, make_model, write_ema, write_st

    ema = EMA(make_model(), 0.0)
    print("ready", flush=True)
    child = 0
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "go":
            child = os.fork()
            if child == 0:
                try:
                    write = write_ema if cmd[1] == "ema_state" else write_st
                    path, k = Path(cmd[2]), int(cmd[3])
                    write(path, k, ema)
                    print("first", flush=True)  # the kill comes after one complete write
                    while True:
                        k += 1
                        write(path, k, ema)
                finally:
                    os._exit(1)
            print(child, flush=True)
        elif cmd[0] == "reap":
            _, status = os.waitpid(child, 0)
            print(status, flush=True)


if __name__ == "__main__":
    main()

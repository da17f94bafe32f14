"""Sum py-spy's collapsed stacks (`py-spy record -f raw`) by function: where a process's time went.

    .venv/bin/python bench/stacks.py STACKS.txt [--top 30] [--match TEXT]

Prints, for the functions on the most samples, the share of samples in which each was on the stack
(inclusive) and on top of it (self). `--match` keeps only frames whose name contains TEXT.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>.*?)(?::\d+)?\)$")


def short(frame: str) -> str:
    found = FRAME.match(frame)
    if not found:
        return frame
    path = found["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{found['name']} ({path})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stacks", type=Path)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--match", default="")
    args = parser.parse_args()
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in args.stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        frames = [short(f) for f in stack.split(";")[1:]]  # the first frame names the thread
        if not frames:
            continue
        total += n
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    print(f"{total:,} samples")
    shown = [(f, n) for f, n in inclusive.most_common() if args.match in f][: args.top]
    for frame, n in shown:
        print(f"{n / total:6.1%} {own[frame] / total:6.1%}  {frame}")


if __name__ == "__main__":
    main()

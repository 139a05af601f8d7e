"""`python -m local_eval COMMAND ...`: score, build, replay, time, show, show-pair."""
from __future__ import annotations

import importlib
import sys

from common.cli import run_main

COMMANDS = {
    "score": ("local_eval.score", "score a submission file against a solution file (GAP, mAP@100)"),
    "build": ("local_eval.build", "build a local competition: synthetic, or a subset of a GLDv2 download"),
    "replay": ("local_eval.replay", "run submission/main.py on a local competition as the server would"),
    "time": ("local_eval.timing", "project a run's timing log to a real competition's size and limit"),
    "show": ("local_eval.show", "HTML report of retrieved neighbours and local matches"),
    "show-pair": ("local_eval.show", "draw the local-feature matches of two images"),
    "demo": ("local_eval.demo", "build, train, export, replay and time a small competition end to end"),
}


def usage() -> str:
    lines = ["usage: python -m local_eval COMMAND [--help] ...", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"error: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    entry = getattr(module, "main_" + argv[0].replace("-", "_"), None) or module.main
    return run_main(entry, argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

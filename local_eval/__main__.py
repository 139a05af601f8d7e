"""`python -m local_eval COMMAND ...`: score, build, replay, time, show, show-pair, tune, tune-merge,
tradeoff, revisited (the demo is `python -m demo`)."""

from __future__ import annotations

import sys

from common.cli import dispatch

COMMANDS = {
    "score": ("local_eval.score:main", "score a submission file against a solution file (GAP, mAP@100)"),
    "build": ("local_eval.build:main", "build a local competition (synthetic, GLDv2 subset) or a revisited dataset"),
    "replay": ("local_eval.replay:main", "run submission/main.py on a local competition as the server would"),
    "time": ("local_eval.projection:main", "project a run's timing log to a real competition's size and limit"),
    "show": ("local_eval.show:main_show", "HTML report of retrieved neighbours and local matches"),
    "show-pair": ("local_eval.show:main_show_pair", "draw the local-feature matches of two images"),
    "tune": ("local_eval.tune:main", "choose the verification and scoring settings by measuring them"),
    "tune-merge": ("local_eval.tune:main_merge", "average tune tables of several seeds and choose on the mean"),
    "tradeoff": ("local_eval.tradeoff:main", "score against projected server hours for each rung of the plan"),
    "revisited": (
        "local_eval.revisited:main",
        "Revisited Oxford / Paris mAP and mP@k, the papers' protocol, through the notebook's pipeline",
    ),
}

if __name__ == "__main__":
    sys.exit(dispatch("local_eval", COMMANDS, sys.argv[1:]))

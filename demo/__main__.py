"""`make demo` (`python -m demo`): the whole competition loop on a generated competition, with no data of the user's.

build the `demo` synthetic competition (about a quarter of `small`) -> train the tiny DELG on CPU -> export -> replay
both tasks -> the HTML report of the recognition replay (`local_eval show`) -> the recognition tradeoff (the first
rungs of the database plan at a few rerank depths, projected to the real competition) -> one summary, with the files
to open and the commands that come next. Every step whose output exists is reused.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

from common.cli import KitArgumentParser, UserError, check_at_least, run_main
from local_eval.layout import nonlandmark_folder, task_folder
from local_eval.metrics import METRIC_NAME, REPORTED_SUBSETS, TASK_METRIC
from local_eval.projection import PROFILES, format_report, projection_report
from local_eval.replay import replay, with_interval
from local_eval.synthetic import SIZES, build_synthetic

# The demo's settings in one place (the stages read nothing else).
DEMO = {
    "out": Path("work/demo"),
    "size": "demo",
    "seed": 0,
    "config": "tiny",  # train/config.py's tiny config, trained for train_steps
    "train_steps": 600,
    "whiten_images": 500,  # training images the export's PCA whitening is fitted on (`export delg`: 5000)
    "limit_h": 0.25,  # each replay's wall-clock limit
    # flags for submission/main.py beyond its defaults, to stay within minutes: each task reranks fewer candidates
    # (the script's defaults: recognition 20, retrieval 100)
    "script_args": {"recognition": ["--rerank", "10"], "retrieval": ["--rerank", "20"]},
    "profile": "recognition-2020",
    "tradeoff_depths": [0, 3, 10],  # recognition rerank depths scored on each rung
    "tradeoff_rungs": 2,  # the first rungs of the plan's ladder: as given, then one global scale
    "show_queries": 12,  # queries pictured in the HTML report
    "probe_images": 30,  # the probe the summary suggests (see docs/fitting-the-server.md)
}
log = logging.getLogger("demo")


def timed(name: str, seconds: dict, fn, *args, **kwargs):
    start = time.monotonic()
    result = fn(*args, **kwargs)
    seconds[name] = round(time.monotonic() - start, 1)
    log.info("demo step %s: %.1f s", name, seconds[name])
    return result


def build_step(out: Path, size: str) -> Path:
    """The competition; an identical earlier build is kept, one of an older kit or another size replaced."""
    competition = out / "competition"
    build_synthetic(competition, size=size, seed=DEMO["seed"], overwrite=True)
    return competition


def train_step(out: Path, competition: Path, steps: int) -> Path:
    from train.config import get_config  # TensorFlow loads only when a step needs it (`--help` stays fast)
    from train.loop import train

    cfg = get_config(DEMO["config"], steps=steps)
    run_dir = out / "run"
    train(cfg, data_dir=task_folder(competition, "recognition"), run_dir=run_dir)  # resumes; no-op when done
    return run_dir


def up_to_date(output: Path, source: Path) -> bool:
    """output exists and was written after source (a later training step or export makes it stale)."""
    return output.is_file() and output.stat().st_mtime >= source.stat().st_mtime


def export_step(out: Path, run_dir: Path) -> Path:
    from export.delg import export_delg
    from export.whitening import WhitenSettings
    from train.run_files import latest_checkpoint

    model = out / "model"
    if not up_to_date(model / "saved_model.pb", Path(latest_checkpoint(run_dir) + ".index")):
        export_delg(run_dir, model, overwrite=True, whiten=WhitenSettings(images=DEMO["whiten_images"]))
    return model


def replay_step(out: Path, competition: Path, model: Path, task: str) -> dict:
    report_dir = out / f"replay-{task}"
    report_path = report_dir / "report.json"
    if up_to_date(report_path, model / "saved_model.pb") and json.loads(report_path.read_text())["status"] == "ok":
        return json.loads(report_path.read_text())
    return replay(competition, task, model, report_dir, DEMO["limit_h"], DEMO["script_args"][task])


def show_step(out: Path, competition: Path, model: Path) -> Path:
    """The HTML report of the recognition replay (scores, precision curve, match pictures); its index.html."""
    from local_eval.show import main_show

    report_dir, replay_dir = out / "show-recognition", out / "replay-recognition"
    if not up_to_date(report_dir / "index.html", replay_dir / "report.json"):
        main_show(
            [
                "--competition",
                str(competition),
                "--task",
                "recognition",
                "--submission",
                str(replay_dir / "submission.csv"),
                "--model",
                str(model),
                "--out",
                str(report_dir),
                "--queries",
                str(DEMO["show_queries"]),
                "--overwrite",
            ]
        )
    return report_dir / "index.html"


def tradeoff_step(out: Path, competition: Path, model: Path) -> str:
    """The recognition tradeoff table at this machine's speed (rungs share the recognition replay's features)."""
    from local_eval.tradeoff import Rungs, Server, tradeoff, write_outputs

    folder = out / "tradeoff"
    if up_to_date(folder / "tradeoff.txt", model / "saved_model.pb"):
        return (folder / "tradeoff.txt").read_text().rstrip("\n")
    shutil.rmtree(folder / "work", ignore_errors=True)  # features of an older model
    profile = PROFILES[DEMO["profile"]]
    rungs = Rungs(competition, "recognition", model, DEMO["limit_h"], DEMO["script_args"]["recognition"])
    table = tradeoff(
        rungs,
        folder,
        Server(profile),
        DEMO["tradeoff_depths"],
        reuse=out / "replay-recognition" / "work",
        max_rungs=DEMO["tradeoff_rungs"],
    )
    return write_outputs(table, "recognition", profile, "this machine's rates, speedup x1", folder)


def usage_table(task: str, report: dict) -> list[str]:
    key = TASK_METRIC[task]
    metric = METRIC_NAME[key]
    lines = [f"  {metric:<8} {'public':>24} {'private':>24} {'all':>24}   (95% bootstrap interval over the queries)"]
    for name in ("global_only", "final"):
        scores = report.get(name) or {}
        if "all" not in scores:
            lines.append(f"  {name:<12} (no scores: {scores.get('error', 'no submission')})")
            continue
        row = " ".join(f"{with_interval(task, scores[subset]):>24}" for subset in REPORTED_SUBSETS)
        lines.append(f"  {'reranked' if name == 'final' else 'global':<8} {row}")
    return lines


def summary(
    reports: dict[str, dict], projection: dict, tradeoff_text: str, step_seconds: dict, files: dict[str, Path]
) -> str:
    lines = ["", "=" * 72, "DEMO SUMMARY (synthetic competition, tiny DELG trained on this CPU)"]
    for task, report in reports.items():
        flags = " ".join(DEMO["script_args"][task]) or "defaults"
        lines += [f"{task} ({flags}): {report['status']} in {report['seconds']:.0f} s", *usage_table(task, report)]
        ran = {k: v for k, v in report["timing"].get("stages", {}).items() if v["items"]}  # a stage with work
        lines.append("  seconds per stage: " + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in ran.items()))
    lines += [
        "",
        format_report(projection),
        "",
        tradeoff_text,
        "",
        *follow_ups(files),
        "demo steps (s): " + ", ".join(f"{k} {v}" for k, v in step_seconds.items()),
        "=" * 72,
    ]
    return "\n".join(lines)


def follow_ups(files: dict[str, Path]) -> list[str]:
    """The files to open and the commands that come next, with this run's paths."""
    recognition = task_folder(files["competition"], "recognition")
    probe = files["out"] / "probe"
    return [
        "open:",
        f"  {files['show']}   the recognition replay: scores, precision curve, match pictures",
        f"  {files['tradeoff']}   score against projected server hours, the best setting that fits ringed",
        "next: time every stage with a probe (the server's own rates when run there), then project it:",
        f"  python submission/main.py --task recognition --data {recognition} --model {files['model']} "
        f"--nonlandmark-dir {nonlandmark_folder(files['competition'])} --probe {DEMO['probe_images']} "
        f"--work {probe}",
        f"  python -m local_eval time --log {probe / 'timing.json'} --profile recognition-2021 --speedup 20",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = KitArgumentParser(
        prog="python -m demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEMO["out"], help="folder for everything the demo makes")
    parser.add_argument("--size", default=DEMO["size"], choices=list(SIZES), help="synthetic competition size")
    parser.add_argument("--train-steps", type=int, default=DEMO["train_steps"], help="training steps (1 or more)")
    args = parser.parse_args(argv)
    check_at_least("--train-steps", args.train_steps, 1)

    seconds: dict[str, float] = {}
    competition = timed("build", seconds, build_step, args.out, args.size)
    run_dir = timed("train", seconds, train_step, args.out, competition, args.train_steps)
    model = timed("export", seconds, export_step, args.out, run_dir)
    reports = {
        task: timed(f"replay_{task}", seconds, replay_step, args.out, competition, model, task)
        for task in ("recognition", "retrieval")
    }
    if not reports["recognition"]["timing"]:
        raise UserError("the recognition replay left no timing log; see its script.log")
    projection = projection_report(reports["recognition"]["timing"], PROFILES[DEMO["profile"]])
    show = timed("show", seconds, show_step, args.out, competition, model)
    tradeoff_text = timed("tradeoff", seconds, tradeoff_step, args.out, competition, model)
    files = {
        "out": args.out,
        "competition": competition,
        "model": model,
        "show": show,
        "tradeoff": args.out / "tradeoff" / "tradeoff.png",
    }
    text = summary(reports, projection, tradeoff_text, seconds, files)
    (args.out / "summary.txt").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Replay submission/main.py on a local competition as the Kaggle server would, then score and time it.

`python -m local_eval replay --competition DIR --task recognition|retrieval --model MODEL_DIR --out REPORT_DIR`

--bundle DIR (instead of --model) runs a Kaggle bundle's kernel.py in a sandbox of the server's limits
(local_eval/sandbox.py): read-only inputs, --disk-gb, --cpus, --ram-gb, no network.

--python PATH runs the script with another interpreter (e.g. a venv of Kaggle's image's versions) while the kit
keeps this one: how to check a new Kaggle image before spending a submission. Without it, $KIT_SCRIPT_PYTHON
or this interpreter runs the script.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from common.cli import (
    EXIT_USER_ERROR,
    KIT_MARKER,
    KitArgumentParser,
    UserError,
    atomic_write_text,
    check_not_an_input,
    check_positive,
    mark_output_dir,
    marker_kind,
    partial_dir,
    swap_in,
)
from common.kit import NOTEBOOK_LIMIT_H
from local_eval.layout import TASK_FOLDERS, nonlandmark_folder, solution_file, task_folder
from local_eval.metrics import (
    BOOTSTRAP_RESAMPLES,
    INTERVAL_PERCENTILES,
    METRIC_NAME,
    REPORTED_SUBSETS,
    TASK_METRIC,
    score_files,
)
from local_eval.submission_script import SCRIPT, SCRIPT_PYTHON_ENV, script_python

LOG_TAIL_LINES = 30
PYTHON_CHECK_S = 120  # a line of Python in the --python interpreter: generous on a loaded machine
REPORT_KIND = "replay report"  # the kind of output its kit marker records
REPORT_FILES = {"report.json", "submission.csv", "script.log", "work", KIT_MARKER}  # what a report folder holds
log = logging.getLogger("replay")


def competition_paths(competition: Path, task: str) -> tuple[Path, Path]:
    """(the input folder the script sees, the solution file it must never see)."""
    data, solution = task_folder(competition, task), solution_file(competition, task)
    for path in (data, solution):
        if not path.exists():
            raise UserError(f"{path}: missing; build a competition with `python -m local_eval build`")
    return data, solution


def check_python(python: str, source: str = "--python") -> str:
    """An interpreter to run the script: a path or a command on PATH that can be executed."""
    found = shutil.which(python)
    if found is None:
        raise UserError(f"{source} {python}: not an executable file or command on PATH")
    return found


@dataclass(frozen=True)
class ScriptRun:
    """One run of the script: its task, input folder, model, WORK, limit, extra flags, the competition's
    distractor folder (None: none) and the interpreter."""

    task: str
    data: Path
    model: Path
    work: Path
    limit_h: float
    extra: list[str]
    nonlandmarks: Path | None = None
    python: str = sys.executable


def script_command(run: ScriptRun, out: Path) -> list[str]:
    """The script's command line, its --out in `out`; the competition's distractor folder goes in as
    --nonlandmark-dir unless the extra flags name one."""
    given = run.nonlandmarks and "--nonlandmark-dir" not in run.extra
    distractors = ["--nonlandmark-dir", str(run.nonlandmarks)] if given else []
    return [
        run.python,
        str(SCRIPT),
        "--task",
        run.task,
        "--data",
        str(run.data),
        "--model",
        str(run.model),
        "--out",
        str(out / "submission.csv"),
        "--work",
        str(run.work),
        "--time-budget-h",
        f"{run.limit_h:g}",
        *distractors,
        *run.extra,
    ]


# Leads the script's process group and kills it once its stdin closes: the replay holds the other end, and the system
# closes it when the replay ends, however it ends (kill -9 included), so the script and its workers never outlive
# the replay. The group exists before the script starts: no moment when the script runs unwatched.
WATCHDOG = "import os, signal, sys; sys.stdin.read(); os.killpg(os.getpgrp(), signal.SIGKILL)"


def run_with_limit(command: list[str], log_path: Path, limit_s: float) -> tuple[str, float]:
    """Run command with stdout+stderr to log_path, in a process group of its own; kill the group at the limit, when
    this process is interrupted or fails, and (through the watchdog leading the group) when it is killed. The status:
    ok, crash, timeout, or refused (it exited 2: its one-line error for a bad input)."""
    start = time.monotonic()
    with (
        subprocess.Popen(
            [sys.executable, "-c", WATCHDOG],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            process_group=0,
        ) as watchdog,
        open(log_path, "w") as log_file,
    ):
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, process_group=watchdog.pid
        )  # in our folder: relative paths in the flags work
        try:
            code = process.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:  # the limit, Ctrl-C or any error here: the script and any worker it left go too
            os.killpg(watchdog.pid, signal.SIGKILL)
            process.wait()
    if code is None:
        return "timeout", time.monotonic() - start
    status = {0: "ok", EXIT_USER_ERROR: "refused"}.get(code, "crash")
    return status, time.monotonic() - start


def score_if_present(task: str, solution: Path, submission: Path) -> dict | None:
    """The submission's scores, each subset's metric with its bootstrap interval over the queries."""
    if not submission.is_file():
        return None
    try:
        return score_files(task, solution, submission, interval=True)
    except UserError as err:
        log.error("cannot score %s: %s", submission, err)
        return {"error": str(err)}


def read_timing(work: Path) -> dict:
    path = work / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def check_python_runs(python: str, source: str) -> None:
    """The interpreter starts and runs a line of Python (/bin/false, a broken venv: one error line, before any
    work)."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; sys.exit(0)"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=PYTHON_CHECK_S,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"{source} {python}: the interpreter could not run the script ({err})") from None
    if result.returncode != 0:
        said = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise UserError(
            f"{source} {python}: the interpreter could not run the script (a line of Python exited "
            f"{result.returncode}: {said})"
        )


def check_model(model: Path) -> None:
    """--model is a SavedModel folder: a run on anything else would only crash."""
    if not (Path(model) / "saved_model.pb").is_file():
        raise UserError(f"--model {model}: not a SavedModel folder (no saved_model.pb in it)")


def check_report_folder(out: Path) -> None:
    """OUT is missing, empty or an earlier replay's report: the new report replaces it whole."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder; choose another report folder")
    kind = marker_kind(out)
    earlier = kind == REPORT_KIND or (kind is None and {p.name for p in out.iterdir()} <= REPORT_FILES)
    if not earlier:
        raise UserError(
            f"--out {out} holds other files than a replay report ({kind or 'not written by this kit'}); "
            "the new report replaces OUT whole: choose another report folder"
        )


def fresh(path: Path, before: dict[Path, tuple[int, int] | None]) -> bool:
    """The file exists and is not the one `before` saw (the script replaces its files by renames)."""
    return path.is_file() and file_identity(path) != before.get(path)


def file_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def replay(
    competition: Path,
    task: str,
    model: Path,
    out: Path,
    limit_h: float,
    extra_args: list[str] | None = None,
    work: Path | None = None,
    python: str | None = None,
) -> dict:
    """Run the script once, score what it left (final and global-only), write out/report.json. Its WORK folder
    is out/work unless another is given (runs sharing one reuse each other's cached features). The script runs
    with `python` (default: $KIT_SCRIPT_PYTHON or this interpreter).

    OUT changes only when the new report is complete (a timeout's or a crash's too): the run goes into a partial
    folder beside OUT, swapped in at the end; Ctrl-C, a bad input or an error leave the old OUT as it was."""
    if task not in TASK_FOLDERS:
        raise UserError(f"unknown task {task!r}; choose recognition or retrieval")
    check_positive("--limit-h", limit_h)  # 0, a negative or NaN would only report a timeout
    source = "--python" if python else f"${SCRIPT_PYTHON_ENV}"
    python = check_python(python or script_python(), source)
    data, solution = competition_paths(Path(competition), task)
    out = Path(out).resolve()
    check_not_an_input("--out", out, [("--competition", competition), ("--model", model)])
    check_model(model)
    check_report_folder(out)
    check_python_runs(python, source)
    with partial_dir(out) as new:
        own_work = work is None
        work = new / "work" if own_work else Path(work).resolve()
        if own_work and (out / "work").is_dir():
            os.replace(out / "work", work)  # the cached features go on; put back unless the new report is complete
        try:
            distractors = nonlandmark_folder(Path(competition))
            script = ScriptRun(
                task,
                data.resolve(),
                Path(model).resolve(),
                work,
                limit_h,
                extra_args or [],
                distractors.resolve() if distractors.is_dir() else None,
                python,
            )
            report = run_and_report(script, solution, new)
            mark_output_dir(new, kind=REPORT_KIND)
            swap_in(new, out)
        except BaseException:
            if own_work and work.is_dir() and out.is_dir():
                os.replace(work, out / "work")
            raise
    return report


def run_and_report(script: ScriptRun, solution: Path, new: Path) -> dict:
    """Run the script with its outputs in `new` (the report folder being made) and WORK, and write new/report.json;
    files an earlier run left in WORK are not scored as this one's."""
    task, work, limit_h, python = script.task, script.work, script.limit_h, script.python
    command = script_command(script, new)
    stale = [work / "submission_global_only.csv", work / "timing.json"]
    before = {path: file_identity(path) for path in stale}
    log.info("replaying %s with a %.3g h limit: %s", task, limit_h, " ".join(command))
    status, seconds = run_with_limit(command, new / "script.log", limit_h * 3600)
    if status == "refused":  # its own error line (argparse's has the program's name before "error: ")
        lines = [line.strip() for line in tail(new / "script.log").splitlines() if line.strip()]
        said = [line.split("error: ", 1)[1] for line in lines if "error: " in line] or lines[-1:] or ["no message"]
        raise UserError(f"the script refused its input: {said[-1]}")
    for path in stale:
        if not fresh(path, before) and work.is_relative_to(new):
            path.unlink(missing_ok=True)  # the new report holds no earlier run's files
    global_only = work / "submission_global_only.csv"
    report = {
        "status": status,
        "seconds": round(seconds, 3),
        "python": python,
        "final": score_if_present(task, solution, new / "submission.csv"),
        "global_only": score_if_present(task, solution, global_only) if fresh(global_only, before) else None,
        "timing": read_timing(work) if fresh(work / "timing.json", before) else {},
    }
    if status != "ok":
        report["log_tail"] = tail(new / "script.log")
    atomic_write_text(new / "report.json", json.dumps(report, indent=2) + "\n")
    return report


def headline(task: str, scores: dict | None) -> str:
    """'public 0.123 [0.081-0.170] | private ... | all ...' of the task's main metric, each with its bootstrap
    interval over the queries (95%)."""
    if not scores or "error" in scores:
        return "no submission" if not scores else f"error: {scores['error']}"
    return " | ".join(f"{subset} {with_interval(task, scores[subset])}" for subset in REPORTED_SUBSETS)


def with_interval(task: str, scores: dict) -> str:
    """'0.123 [0.081-0.170]': one subset's metric and its bootstrap interval ('n/a' where undefined)."""
    key = TASK_METRIC[task]
    value, interval = scores[key], scores.get(f"{key}_interval")
    text = "n/a" if value is None else f"{value:.4f}"
    return text + (f" [{interval[0]:.4f}-{interval[1]:.4f}]" if interval else "")


def format_report(task: str, report: dict) -> str:
    metric = METRIC_NAME[TASK_METRIC[task]]
    versions = report["timing"].get("versions", {})
    lines = [
        f"{task}: status {report['status']} in {report['seconds']:.1f} s",
        f"  run by {report['python']}: " + (", ".join(f"{k} {v}" for k, v in versions.items()) or "no versions"),
        f"  {metric} global only: {headline(task, report['global_only'])}",
        f"  {metric} final:       {headline(task, report['final'])}",
        f"  [low-high]: {INTERVAL_PERCENTILES[0]:g}-{INTERVAL_PERCENTILES[1]:g}% of {BOOTSTRAP_RESAMPLES} "
        "bootstrap resamples of the queries: differences inside it may be chance",
    ]
    for name, stage in report["timing"].get("stages", {}).items():
        lines.append(f"  {name:<15} {stage['items']:>7} items {stage['seconds']:8.1f} s")
    if "log_tail" in report:
        lines += ["  last lines of the script's log:", *("    " + line for line in report["log_tail"].splitlines())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from local_eval.sandbox import DEFAULT_DISK_GB, Limits, format_sandbox, replay_bundle  # it imports this module

    parser = KitArgumentParser(
        prog="python -m local_eval replay", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--competition", required=True, type=Path, help="folder written by `local_eval build`")
    parser.add_argument("--task", required=True, choices=sorted(TASK_FOLDERS))
    given = parser.add_mutually_exclusive_group(required=True)
    given.add_argument("--model", type=Path, help="exported DELG SavedModel folder")
    given.add_argument(
        "--bundle",
        type=Path,
        help="a bundle of `python -m export bundle`: its kernel.py run as Kaggle "
        "runs it (local_eval/sandbox.py, docs/kaggle-sandbox.md)",
    )
    parser.add_argument("--out", required=True, type=Path, help="report folder (report.json, submissions, log)")
    parser.add_argument(
        "--limit-h",
        type=float,
        default=NOTEBOOK_LIMIT_H,
        help="wall-clock limit of the run, in hours (default %(default)s)",
    )
    parser.add_argument(
        "--python",
        default=None,
        metavar="PATH",
        help="interpreter that runs the script, e.g. a venv of Kaggle's image's versions "
        f"(default: ${SCRIPT_PYTHON_ENV}, else this one)",
    )
    limits = parser.add_argument_group("the sandbox of --bundle")
    limits.add_argument(
        "--disk-gb", type=float, default=DEFAULT_DISK_GB, help="size of /kaggle/working (default %(default)s)"
    )
    limits.add_argument("--cpus", type=int, default=None, help="CPUs the run may use (default: all of this process's)")
    limits.add_argument("--ram-gb", type=float, default=None, help="memory of the run's processes (default: no limit)")
    parser.add_argument("script_args", nargs="*", help="extra flags for submission/main.py, after `--`")
    args = parser.parse_args(argv)
    if args.bundle is not None and args.python is not None:
        parser.error("--python does not apply to --bundle: the sandbox runs kernel.py with this interpreter's packages")
    if args.bundle is not None:
        report = replay_bundle(
            args.competition,
            args.task,
            args.bundle,
            args.out,
            args.limit_h,
            Limits(args.disk_gb, args.cpus, args.ram_gb),
            args.script_args,
        )
        print(format_report(args.task, report) + "\n" + format_sandbox(report["sandbox"]))
        return 0 if report["status"] == "ok" else 1
    report = replay(
        args.competition, args.task, args.model, args.out, args.limit_h, args.script_args, python=args.python
    )
    print(format_report(args.task, report))
    return 0 if report["status"] == "ok" else 1

"""Project a local run's per-stage rates to a real competition's size and machine: hours, peak memory and WORK's
disk, each against its limit (submission/costs.py's cost model; "fits" needs all three).

`python -m local_eval time --log WORK/timing.json --profile recognition-2021 [--speedup X] [--matmul-speedup Y]`
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from common.cli import KitArgumentParser, UserError, check_at_least, check_positive
from local_eval.submission_script import sibling

costs = sibling("costs")  # the script's cost model: each stage's units, rates and bytes, written down once
competitions = sibling("competitions")  # the competitions' sizes, limits and machines, written down once
STAGES = costs.TIMING_STAGES


@dataclass(frozen=True)
class Profile:
    """A real competition's scale and machine; `db` is the train set (recognition) or the index (retrieval)."""

    task: str
    db: int
    test: int
    limit_h: float
    ram_gb: float = competitions.KAGGLE_GPU.ram_gb
    disk_gb: float = competitions.KAGGLE_GPU.disk_gb
    cpus: int = competitions.KAGGLE_GPU.cpus
    gpus: int = competitions.KAGGLE_GPU.gpus
    train: int = 0  # retrieval's label transfer: the labelled train set's images


def profile_of(competition) -> Profile:
    machine = competition.machine
    return Profile(
        competition.task,
        competition.db,
        competition.test,
        competition.limit_h,
        machine.ram_gb,
        machine.disk_gb,
        machine.cpus,
        machine.gpus,
        competition.train,
    )


# submission/competitions.py's table (GLDv2's sizes, each year's limit, Kaggle's machine): every field can be
# overridden on the command line.
PROFILES: dict[str, Profile] = {competitions.profile_name(c): profile_of(c) for c in competitions.COMPETITIONS.values()}


def load_timing(path: Path) -> dict:
    """Read the submission script's timing.json; a file that is not one is a UserError naming it (and the field)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: a folder, not a timing log (give the timing.json in a run's --work folder)")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{path}: no such timing log") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as a timing log ({getattr(err, 'strerror', None) or err})") from None
    try:
        log = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not JSON ({err})") from None
    check_timing(log, path)
    return log


def check_log_task(log: dict, path: Path, profile: Profile, profile_name: str) -> None:
    """A log of one task projected with the other task's profile is a UserError naming both."""
    task = log.get("task")
    if task is not None and task != profile.task:
        choices = ", ".join(name for name, p in PROFILES.items() if p.task == task)
        raise UserError(
            f"--log {path} times a {task} run but --profile {profile_name} is a {profile.task} "
            f"competition; choose a {task} profile ({choices})"
        )


def check_timing(log, path: Path) -> None:
    """The fields `time` reads: stages (global_db and global_query at least) of items and seconds, rerank_depth."""
    if not isinstance(log, dict):
        raise UserError(
            f"{path}: expected a JSON object (the timing.json submission/main.py writes), found {json_kind(log)}"
        )
    stages = log.get("stages")
    if not isinstance(stages, dict) or not {"global_db", "global_query"} <= set(stages):
        raise UserError(f"{path}: expected a 'stages' object with at least global_db and global_query")
    for name, stage in stages.items():
        if not isinstance(stage, dict) or not {"items", "seconds"} <= set(stage):
            raise UserError(f"{path}: stage {name!r} needs 'items' and 'seconds'")
        check_count(path, f"stages.{name}.items", stage["items"])
        if not (is_number(stage["seconds"]) and math.isfinite(stage["seconds"]) and stage["seconds"] >= 0):
            raise UserError(
                f"{path}: stages.{name}.seconds must be a number of seconds >= 0, found {json_kind(stage['seconds'])}"
            )
    if "rerank_depth" in log:
        check_count(path, "rerank_depth", log["rerank_depth"])


def check_count(path: Path, field: str, value) -> None:
    if not (is_number(value) and math.isfinite(value) and value >= 0 and value == int(value)):
        raise UserError(f"{path}: {field} must be a whole number >= 0, found {json_kind(value)}")


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def json_kind(value) -> str:
    """How a JSON value reads in an error: the number itself, or its kind."""
    if is_number(value):
        return json.dumps(value)
    if isinstance(value, str):
        return f"the string {json.dumps(value[:40])}"
    kinds = {type(None): "null", bool: json.dumps(value), list: "a list", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


def full_size(log: dict, profile: Profile):
    """The profile's sizes, with the run's non-landmark set (and the profile's train set when the run used one)."""
    work = log.get("work") or {}
    train = profile.train if work.get("bridge") else 0
    return costs.Sizes(profile.db, profile.test, int(work.get("nonlandmarks", 0)), train)


def server_of(profile: Profile, speedup: float, matmul_speedup: float):
    return costs.Server(speedup, matmul_speedup, profile.cpus)


def project(
    log: dict, profile: Profile, rerank: int, speedup: float = 1.0, matmul_speedup: float = 1.0
) -> dict[str, float | None]:
    """Hours per stage at full size with `rerank` candidates verified per query (None: not measured); local
    features are an upper bound: a database image shared by several queries is extracted once."""
    seconds, _ = costs.projected_seconds(
        log, full_size(log, profile), rerank, server_of(profile, speedup, matmul_speedup)
    )
    return {name: None if s is None else s / 3600 for name, s in seconds.items()}


def unmeasured_stages(log: dict, profile: Profile, rerank: int) -> list[str]:
    """The stages a projection at this rerank depth needs that the log did no work in (cached or skipped)."""
    return [name for name, hours in project(log, profile, rerank).items() if hours is None]


def max_rerank_depth(
    log: dict, profile: Profile, speedup: float, margin: float, matmul_speedup: float = 1.0
) -> int | None:
    """The largest rerank depth whose projected total stays inside the limit less the margin; None when a stage it
    needs was not measured, or when nothing fits, not even depth 0."""
    cost, _ = costs.server_rates(log, server_of(profile, speedup, matmul_speedup))
    if cost["local_features"] is None or cost["verification"] is None:
        return None
    fixed = project(log, profile, 0, speedup, matmul_speedup).values()
    if any(h is None for h in fixed) or sum(fixed) > profile.limit_h * (1 - margin):
        return None
    room_s = (profile.limit_h * (1 - margin) - sum(fixed)) * 3600
    depth = costs.depth_that_fits(room_s, profile.test, cost["local_features"], cost["verification"])
    return max(0, math.floor(depth)) if math.isfinite(depth) else None


def verdict(total_h: float, profile: Profile, margin: float, unmeasured: list[str], memory: dict, disk: dict) -> str:
    """One line: fits when the hours, the peak memory and WORK's disk each stay inside their limit less the margin;
    else what does not fit."""
    if unmeasured:
        return (
            f"cannot project: {', '.join(unmeasured)} {'was' if len(unmeasured) == 1 else 'were'} not measured "
            "in this run (cached or skipped); time a cold run (a fresh --work) or a probe "
            "(submission/main.py --probe N) and project its timing.json"
        )
    keep = 1 - margin
    over = [
        text
        for text, used, limit in (
            (
                f"time {total_h:.2f} h > {profile.limit_h * keep:.2f} h ({profile.limit_h:g} h less "
                f"{margin:.0%} margin)",
                total_h,
                profile.limit_h,
            ),
            (
                f"memory {memory['peak']:.1f} GB > {profile.ram_gb * keep:.1f} GB ({profile.ram_gb:g} GB RAM less "
                f"{margin:.0%})",
                memory["peak"],
                profile.ram_gb,
            ),
            (
                f"disk {disk['work']:.1f} GB > {profile.disk_gb * keep:.1f} GB ({profile.disk_gb:g} GB less "
                f"{margin:.0%})",
                disk["work"],
                profile.disk_gb,
            ),
        )
        if used > limit * keep
    ]
    if over:
        return "DOES NOT FIT: " + "; ".join(over)
    return (
        f"fits: {total_h:.2f} h of {profile.limit_h:g} h, memory {memory['peak']:.1f} of {profile.ram_gb:g} GB, "
        f"disk {disk['work']:.1f} of {profile.disk_gb:g} GB (margin {margin:.0%} kept)"
    )


def depth_advice(log: dict, profile: Profile, speedup: float, margin: float, matmul_speedup: float = 1.0) -> str | None:
    """The line on rerank depth: the largest that fits, or that nothing does (None when it cannot be said)."""
    global_only = project(log, profile, 0, speedup, matmul_speedup)
    if any(h is None for h in global_only.values()):
        return None
    allowed = profile.limit_h * (1 - margin)
    if sum(global_only.values()) > allowed:
        return (
            f"nothing fits, not even global-only (rerank depth 0): {sum(global_only.values()):.2f} h > {allowed:.2f} h"
        )
    depth = max_rerank_depth(log, profile, speedup, margin, matmul_speedup)
    return None if depth is None else f"largest rerank depth that fits: {depth}"


def projection_report(
    log: dict,
    profile: Profile,
    speedup: float = 1.0,
    margin: float = costs.SAFETY_MARGIN,
    rerank: int | None = None,
    matmul_speedup: float = 1.0,
) -> dict:
    """Everything `time` prints, as a dict (the demo and the replay report embed it). With a stage the projection
    needs unmeasured, `fits` is None and total_hours counts only the measured stages."""
    rerank = int(log.get("rerank_depth", 0)) if rerank is None else rerank
    sizes = full_size(log, profile)
    hours = project(log, profile, rerank, speedup, matmul_speedup)
    _, bounds = costs.projected_seconds(log, sizes, rerank, server_of(profile, speedup, matmul_speedup))
    total = sum(h for h in hours.values() if h is not None)
    unmeasured = [name for name, h in hours.items() if h is None]
    memory = costs.projected_memory(log, sizes, rerank, gpu=profile.gpus > 0)
    disk = costs.projected_disk(log, sizes, rerank)
    keep = 1 - margin
    fits = (
        total <= profile.limit_h * keep
        and memory["peak"] <= profile.ram_gb * keep
        and disk["work"] <= profile.disk_gb * keep
    )
    return {
        "profile": dataclasses.asdict(profile),
        "speedup": speedup,
        "matmul_speedup": matmul_speedup,
        "margin": margin,
        "rerank_depth": rerank,
        "hours": hours,
        "bound_by": bounds,
        "total_hours": total,
        "memory_gb": memory,
        "disk_gb": disk,
        "fits": None if unmeasured else fits,
        "verdict": verdict(total, profile, margin, unmeasured, memory, disk),
        "max_rerank_depth": max_rerank_depth(log, profile, speedup, margin, matmul_speedup),
        "depth_advice": depth_advice(log, profile, speedup, margin, matmul_speedup),
        "unmeasured": unmeasured,
    }


def train_text(report: dict) -> str:
    """', train 1,580,470 (label transfer)' when the projection holds the train set's pass and products."""
    used = report["hours"].get("global_train") or report["hours"].get("bridge")
    return f", train {report['profile']['train']:,} (label transfer)" if used and report["profile"]["train"] else ""


def format_report(report: dict) -> str:
    p = report["profile"]
    lines = [
        f"projection to {p['task']}: db {p['db']:,} images, test {p['test']:,}{train_text(report)}, limit "
        f"{p['limit_h']:g} h,"
        f" {p['ram_gb']:g} GB RAM, {p['disk_gb']:g} GB disk, {p['cpus']} CPUs; rerank depth "
        f"{report['rerank_depth']}, speedup x{report['speedup']:g} on CNN passes, "
        f"x{report['matmul_speedup']:g} on matrix products"
    ]
    for name, hours in report["hours"].items():
        if p["task"] == "recognition" and name in costs.RETRIEVAL_ONLY and not hours:
            continue
        bound = f"  ({report['bound_by'][name]} bound)" if name in report["bound_by"] and hours else ""
        lines.append(f"  {name:<15} {'not measured' if hours is None else f'{hours:8.2f} h'}{bound}")
    partial = " + the stages not measured" if report["unmeasured"] else ""
    lines.append(f"  {'total':<15} {report['total_hours']:8.2f} h{partial}   (limit {p['limit_h']:g} h)")
    memory, disk = report["memory_gb"], report["disk_gb"]
    stages = ", ".join(f"{name} {gb:.1f}" for name, gb in memory["stages"].items())
    lines.append(
        f"  {'peak memory':<15} {memory['peak']:8.1f} GB  (limit {p['ram_gb']:g} GB; {stages}; "
        f"baseline {memory['baseline']:.1f})"
    )
    parts = ", ".join(f"{name} {gb:.1f}" for name, gb in disk.items() if name != "work")
    lines.append(f"  {'WORK disk':<15} {disk['work']:8.1f} GB  (limit {p['disk_gb']:g} GB; {parts})")
    lines.append(f"verdict (speedup x{report['speedup']:g}): {report['verdict']}")
    if report["depth_advice"]:
        lines.append(report["depth_advice"])
    return "\n".join(lines)


def resolve_profile(name: str, overrides: dict) -> Profile:
    if name not in PROFILES:
        raise UserError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    return dataclasses.replace(PROFILES[name], **{k: v for k, v in overrides.items() if v is not None})


def check_flags(args: argparse.Namespace) -> None:
    """Numbers that make no projection are flag errors, not a verdict."""
    check_positive("--speedup", args.speedup)
    check_positive("--matmul-speedup", args.matmul_speedup)
    if not 0 <= args.margin < 1:
        raise UserError(f"--margin is a share of the limit, from 0 up to (not including) 1; got {args.margin}")
    for flag, value in (
        ("--limit-h", args.limit_h),
        ("--db", args.db),
        ("--test", args.test),
        ("--ram-gb", args.ram_gb),
        ("--disk-gb", args.disk_gb),
        ("--cpus", args.cpus),
        ("--train", args.train),
    ):
        if value is not None:
            check_positive(flag, value)
    if args.rerank is not None:
        check_at_least("--rerank", args.rerank, 0)


def main(argv: list[str] | None = None) -> int:
    parser = KitArgumentParser(
        prog="python -m local_eval time", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log", required=True, type=Path, help="timing.json written by submission/main.py")
    parser.add_argument("--profile", required=True, help=f"competition profile: {', '.join(PROFILES)}")
    parser.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="how many times faster the server's GPU runs the CNN passes (global and local features) than this run",
    )
    parser.add_argument(
        "--matmul-speedup",
        type=float,
        default=1.0,
        help="how many times faster the server runs the matrix products (kNN, DBA, alpha-QE, "
        "SuperGlobal) than this run: a GPU ran the recognition kNN in "
        f"{costs.GPU_KNN_S['float32']:g} s (float32; {costs.GPU_KNN_S['float16']:g} s float16) "
        f"against {costs.NUMPY_16_CORES_KNN_S:g} s for numpy on 16 cores, "
        f"x{costs.GPU_MATMUL_SPEEDUP:.0f} (docs/fitting-the-server.md)",
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=costs.SAFETY_MARGIN,
        help="share of every limit (time, memory, disk) to keep free (default: the script's)",
    )
    parser.add_argument("--rerank", type=int, help="rerank depth to project (default: the run's own)")
    parser.add_argument("--limit-h", type=float, help="override the profile's notebook limit in hours")
    parser.add_argument("--db", type=int, help="override the profile's train/index size")
    parser.add_argument("--test", type=int, help="override the profile's test size")
    parser.add_argument(
        "--train", type=int, help="override the profile's labelled train set (retrieval's label transfer)"
    )
    parser.add_argument("--ram-gb", type=float, help="override the profile's machine memory (GB)")
    parser.add_argument("--disk-gb", type=float, help="override the profile's working disk (GB)")
    parser.add_argument("--cpus", type=int, help="override the profile's CPUs (they decode images)")
    parser.add_argument("--json", action="store_true", help="print the projection as one JSON object")
    args = parser.parse_args(argv)
    check_flags(args)
    profile = resolve_profile(
        args.profile,
        {
            "limit_h": args.limit_h,
            "db": args.db,
            "test": args.test,
            "ram_gb": args.ram_gb,
            "disk_gb": args.disk_gb,
            "cpus": args.cpus,
            "train": args.train,
        },
    )
    log = load_timing(args.log)
    check_log_task(log, args.log, profile, args.profile)
    report = projection_report(log, profile, args.speedup, args.margin, args.rerank, args.matmul_speedup)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

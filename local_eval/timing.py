"""Project a local run's per-stage rates to a real competition's size, against its notebook time limit.

`python -m local_eval time --log WORK/timing.json --profile recognition-2021 [--speedup X]`
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from common.cli import KitArgumentParser, UserError, check_at_least, check_positive
from common.kit import NOTEBOOK_LIMIT_H
from local_eval.submission_script import sibling

budget = sibling("budget")  # the script's cost model: what each stage does per item, written down once
STAGES = budget.TIMING_STAGES
GPU_STAGES = ("global_db", "global_query", "knn", "local_features")  # --speedup applies to these
DEFAULT_MARGIN = 0.1  # keep 10% of the limit free: server machines vary


@dataclass(frozen=True)
class Profile:
    """A real competition's scale; `db` is the train set (recognition) or the index (retrieval)."""

    task: str
    db: int
    test: int
    limit_h: float


# Sizes of GLDv2 (train-clean 1,580,470; index 761,757; test 117,577). The notebook limit changed between
# years (9 h in 2020, 12 h in 2021): every field can be overridden on the command line.
PROFILES: dict[str, Profile] = {
    "recognition-2020": Profile("recognition", db=1_580_470, test=117_577, limit_h=NOTEBOOK_LIMIT_H),
    "recognition-2021": Profile("recognition", db=1_580_470, test=117_577, limit_h=12.0),
    "retrieval-2020": Profile("retrieval", db=761_757, test=117_577, limit_h=NOTEBOOK_LIMIT_H),
    "retrieval-2021": Profile("retrieval", db=761_757, test=117_577, limit_h=12.0),
}


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
        raise UserError(f"--log {path} times a {task} run but --profile {profile_name} is a {profile.task} "
                        f"competition; choose a {task} profile ({choices})")


def check_timing(log, path: Path) -> None:
    """The fields `time` reads: stages (global_db and global_query at least) of items and seconds, rerank_depth."""
    if not isinstance(log, dict):
        raise UserError(f"{path}: expected a JSON object (the timing.json submission/main.py writes), "
                        f"found {json_kind(log)}")
    stages = log.get("stages")
    if not isinstance(stages, dict) or not {"global_db", "global_query"} <= set(stages):
        raise UserError(f"{path}: expected a 'stages' object with at least global_db and global_query")
    for name, stage in stages.items():
        if not isinstance(stage, dict) or not {"items", "seconds"} <= set(stage):
            raise UserError(f"{path}: stage {name!r} needs 'items' and 'seconds'")
        check_count(path, f"stages.{name}.items", stage["items"])
        if not (is_number(stage["seconds"]) and math.isfinite(stage["seconds"]) and stage["seconds"] >= 0):
            raise UserError(f"{path}: stages.{name}.seconds must be a number of seconds >= 0, "
                            f"found {json_kind(stage['seconds'])}")
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


def seconds_per_item(stage: dict | None) -> float | None:
    """Measured cost of one item of a stage, or None where the stage did no work in this run."""
    if not stage or stage["items"] <= 0:
        return None
    return stage["seconds"] / stage["items"]


def unit_costs(log: dict, speedup: float) -> dict[str, float | None]:
    """Seconds per unit of each stage; knn's unit (as the script logs it) is one query x one database row."""
    costs = {name: seconds_per_item(log["stages"].get(name)) for name in STAGES}
    return {name: (None if cost is None else cost / speedup if name in GPU_STAGES else cost)
            for name, cost in costs.items()}


def full_size(log: dict, profile: Profile) -> tuple[object, dict]:
    """(the profile's sizes, the run's work flags): the non-landmark set and the global stage as the run had them."""
    work = log.get("work") or {}
    sizes = budget.Sizes(profile.db, profile.test, int(work.get("nonlandmarks", 0)))
    return sizes, {flag: bool(work.get(flag)) for flag in ("suppression", "dba", "global_rerank")}


def project(log: dict, profile: Profile, rerank: int, speedup: float = 1.0) -> dict[str, float | None]:
    """Hours per stage at full size with `rerank` candidates verified per query (None: not measured); local
    features are an upper bound: a database image shared by several queries is extracted once."""
    sizes, flags = full_size(log, profile)
    seconds = budget.project_seconds(unit_costs(log, speedup), budget.stage_units(sizes, rerank, **flags))
    return {name: None if s is None else s / 3600 for name, s in seconds.items()}


def unmeasured_stages(log: dict, profile: Profile, rerank: int) -> list[str]:
    """The stages a projection at this rerank depth needs that the log did no work in (cached or skipped)."""
    return [name for name, hours in project(log, profile, rerank).items() if hours is None]


def max_rerank_depth(log: dict, profile: Profile, speedup: float, margin: float) -> int | None:
    """The largest rerank depth whose projected total stays inside the limit less the margin; None when a stage it
    needs was not measured, or when nothing fits, not even depth 0."""
    cost = unit_costs(log, speedup)
    if cost["local_features"] is None or cost["verification"] is None:
        return None
    fixed = project(log, profile, rerank=0, speedup=speedup).values()
    if any(h is None for h in fixed) or sum(fixed) > profile.limit_h * (1 - margin):
        return None
    room_s = (profile.limit_h * (1 - margin) - sum(fixed)) * 3600
    depth = budget.depth_that_fits(room_s, profile.test, cost["local_features"], cost["verification"])
    return max(0, math.floor(depth)) if math.isfinite(depth) else None


def verdict(total_h: float, profile: Profile, margin: float, unmeasured: list[str]) -> str:
    if unmeasured:
        return (f"cannot project: {', '.join(unmeasured)} {'was' if len(unmeasured) == 1 else 'were'} not measured "
                "in this run (cached or skipped); time a cold run (a fresh --work) or a probe "
                "(submission/main.py --probe N) and project its timing.json")
    allowed = profile.limit_h * (1 - margin)
    if total_h <= allowed:
        return f"fits: {total_h:.2f} h of {profile.limit_h:g} h (margin {margin:.0%} kept)"
    return f"DOES NOT FIT: {total_h:.2f} h > {allowed:.2f} h ({profile.limit_h:g} h less {margin:.0%} margin)"


def depth_advice(log: dict, profile: Profile, speedup: float, margin: float) -> str | None:
    """The line on rerank depth: the largest that fits, or that nothing does (None when it cannot be said)."""
    global_only = project(log, profile, rerank=0, speedup=speedup)
    if any(h is None for h in global_only.values()):
        return None
    allowed = profile.limit_h * (1 - margin)
    if sum(global_only.values()) > allowed:
        return (f"nothing fits, not even global-only (rerank depth 0): {sum(global_only.values()):.2f} h > "
                f"{allowed:.2f} h")
    depth = max_rerank_depth(log, profile, speedup, margin)
    return None if depth is None else f"largest rerank depth that fits: {depth}"


def projection_report(log: dict, profile: Profile, speedup: float = 1.0, margin: float = DEFAULT_MARGIN,
                      rerank: int | None = None) -> dict:
    """Everything `time` prints, as a dict (the demo and the replay report embed it). With a stage the projection
    needs unmeasured, `fits` is None and total_hours counts only the measured stages."""
    rerank = int(log.get("rerank_depth", 0)) if rerank is None else rerank
    hours = project(log, profile, rerank, speedup)
    total = sum(h for h in hours.values() if h is not None)
    unmeasured = [name for name, h in hours.items() if h is None]
    return {
        "profile": dataclasses.asdict(profile),
        "speedup": speedup,
        "margin": margin,
        "rerank_depth": rerank,
        "hours": hours,
        "total_hours": total,
        "fits": None if unmeasured else total <= profile.limit_h * (1 - margin),
        "verdict": verdict(total, profile, margin, unmeasured),
        "max_rerank_depth": max_rerank_depth(log, profile, speedup, margin),
        "depth_advice": depth_advice(log, profile, speedup, margin),
        "unmeasured": unmeasured,
    }


def format_report(report: dict) -> str:
    p = report["profile"]
    lines = [f"projection to {p['task']}: db {p['db']:,} images, test {p['test']:,}, limit {p['limit_h']:g} h,"
             f" rerank depth {report['rerank_depth']}, speedup x{report['speedup']:g} on GPU stages"]
    for name, hours in report["hours"].items():
        lines.append(f"  {name:<15} {'not measured' if hours is None else f'{hours:8.2f} h'}")
    partial = " + the stages not measured" if report["unmeasured"] else ""
    lines.append(f"  {'total':<15} {report['total_hours']:8.2f} h{partial}")
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
    if not 0 <= args.margin < 1:
        raise UserError(f"--margin is a share of the limit, from 0 up to (not including) 1; got {args.margin}")
    for flag, value in (("--limit-h", args.limit_h), ("--db", args.db), ("--test", args.test)):
        if value is not None:
            check_positive(flag, value)
    if args.rerank is not None:
        check_at_least("--rerank", args.rerank, 0)


def main(argv: list[str] | None = None) -> int:
    parser = KitArgumentParser(prog="python -m local_eval time", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, type=Path, help="timing.json written by submission/main.py")
    parser.add_argument("--profile", required=True, help=f"competition profile: {', '.join(PROFILES)}")
    parser.add_argument("--speedup", type=float, default=1.0,
                        help="how many times faster the server's GPU runs the network stages than this run")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="share of the limit to keep free")
    parser.add_argument("--rerank", type=int, help="rerank depth to project (default: the run's own)")
    parser.add_argument("--limit-h", type=float, help="override the profile's notebook limit in hours")
    parser.add_argument("--db", type=int, help="override the profile's train/index size")
    parser.add_argument("--test", type=int, help="override the profile's test size")
    parser.add_argument("--json", action="store_true", help="print the projection as one JSON object")
    args = parser.parse_args(argv)
    check_flags(args)
    profile = resolve_profile(args.profile, {"limit_h": args.limit_h, "db": args.db, "test": args.test})
    log = load_timing(args.log)
    check_log_task(log, args.log, profile, args.profile)
    report = projection_report(log, profile, args.speedup, args.margin, args.rerank)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0

"""`python -m local_eval tradeoff`: what each step of the database plan's ladder costs in score and saves in time.

    python -m local_eval tradeoff --competition DIR --task recognition|retrieval --model MODEL --out OUT \
        [--profile P] [--rungs N] [--log WORK/timing.json | --speedup X] [-- extra submission/main.py flags]

Replays the script once per rung of its ladder (the settings as given, float16 when the model has it, one global
scale, longer side 768, 512; the first --rungs N of them), each reranking to the deepest of --depths; the rungs
share one WORK folder, so local features are extracted once. Each run is scored at every depth from its verified
pairs (no new RANSAC) and projected to the profile's full size from the rates it measured: scaled by --speedup, or
anchored to the rates a probe measured on the real server (--log; the ladder's relative costs still come from these
runs). Writes OUT/tradeoff.csv and OUT/tradeoff.png (score against projected hours, the limit marked) and prints the
table.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import (
    KitArgumentParser,
    UserError,
    atomic_write_text,
    check_at_least,
    check_not_an_input,
    check_positive,
    check_writable_folder,
)
from local_eval import draw
from local_eval.metrics import METRIC_NAME, REPORTED_SUBSETS, TASK_METRIC
from local_eval.projection import (
    PROFILES,
    Profile,
    check_log_task,
    costs,
    load_timing,
    projection_report,
    resolve_profile,
    unmeasured_stages,
)
from local_eval.replay import competition_paths, replay
from local_eval.submission_script import load_submission
from local_eval.tune import ExtractionRun, Scorer, read_run, score_one, split_script_args

log = logging.getLogger("tradeoff")

DEPTHS = {"recognition": [0, 1, 3, 10], "retrieval": [0, 10, 30, 100]}


def rung_flags(extraction) -> list[str]:
    """The script flags that put the global pass on this rung, and keep it there."""
    return [
        "--global-precision",
        extraction.global_precision,
        "--global-max-side",
        str(extraction.global_max_side),
        "--global-scale-indices",
        *map(str, extraction.global_scale_indices),
        "--plan",
        "fixed",
    ]


def verified_inliers(run: ExtractionRun) -> np.ndarray:
    """Inliers [queries, candidates] from WORK/verified_pairs.csv (-1 where a pair was not verified)."""
    pairs = pd.read_csv(run.work / "verified_pairs.csv", dtype={"id": str, "candidate": str})
    row = {test_id: q for q, test_id in enumerate(run.test_ids)}
    inliers = np.full(run.neighbours.shape, -1, np.int64)
    inliers[pairs["id"].map(row).to_numpy(), pairs["rank"].to_numpy() - 1] = pairs["inliers"].to_numpy()
    return inliers


def stage_rates(timing: dict) -> dict[str, dict]:
    """The stages of a timing log that measured something."""
    return {name: stage for name, stage in timing["stages"].items() if stage["items"] > 0}


def measured_stages(timing: dict, reference: dict) -> dict[str, dict]:
    """Each stage's best measurement: the global ones from this rung's run (the reference's when this run found
    them cached), the others from whichever run measured more items (the rungs share one local cache, so a later
    rung extracts only a few features, and a rate over a few items is mostly start-up)."""
    own, first = stage_rates(timing), stage_rates(reference)
    stages = {}
    for name in dict.fromkeys([*first, *own]):  # the logs' stage order
        candidates = [stage for stage in (own.get(name), first.get(name)) if stage is not None]
        stages[name] = candidates[0] if name.startswith("global") else max(candidates, key=lambda s: s["items"])
    return stages


MEASURED_FIELDS = ("timed_products", "decode", "memory")  # what the cost model reads beside the stages


def rung_log(timing: dict, reference: dict, server: dict | None) -> dict:
    """A timing log for the cost model: this rung's measured stages (see measured_stages) and the run's work
    (its flags: suppression, DBA, alpha-QE, SuperGlobal, descriptor sizes). With a server log, every stage takes
    the server's rate, the global stages scaled by this rung's cost relative to the first rung's here, and the
    server's timed products and decode rate."""
    stages = measured_stages(timing, reference)
    work = {"work": timing.get("work") or reference.get("work") or {}, "task": timing.get("task")}
    if server is None:
        # the reference's timed product and decode rate: every rung, and the run it reuses, project one kNN rate
        return {"stages": stages, **work, **{k: reference.get(k) or timing.get(k) or {} for k in MEASURED_FIELDS}}
    scaled = {}
    for name, server_stage in stage_rates(server).items():
        factor = 1.0
        if name in costs.GLOBAL_PASSES and name in stages and name in stage_rates(reference):
            factor = costs.rate(stages[name]) / costs.rate(reference["stages"][name])
        scaled[name] = {"items": server_stage["items"], "seconds": server_stage["seconds"] * factor}
    return {"stages": scaled, **work, **{k: server.get(k) or {} for k in MEASURED_FIELDS}}


def reuse_caches(source: Path, work: Path) -> None:
    """Start WORK with the feature caches of an earlier run of the same model (hard links: no copies, and the
    script replaces cache files by renames, so neither run changes the other's)."""
    if work.exists() or not (source / "cache_key.json").is_file():
        return
    for folder in ("global", "local"):
        if (source / folder).is_dir():
            shutil.copytree(source / folder, work / folder, copy_function=os.link)
    shutil.copy2(source / "cache_key.json", work / "cache_key.json")


@dataclass(frozen=True)
class Rungs:
    """What each rung replays: the competition, task and model, the replay's limit and the script's flags."""

    competition: Path
    task: str
    model: Path
    limit_h: float
    script_args: list[str]


@dataclass(frozen=True)
class Server:
    """Where the rungs are projected to: the profile, and the rates of a server's timing log or this machine's
    divided by the CNN and matrix-product speedups."""

    profile: Profile
    log: dict | None = None
    speedup: float = 1.0
    matmul_speedup: float = 1.0

    def factors(self) -> tuple[float, float]:
        return (1.0, 1.0) if self.log else (self.speedup, self.matmul_speedup)


def tradeoff(
    rungs: Rungs, out: Path, server: Server, depths: list[int], reuse: Path | None = None, max_rungs: int | None = None
) -> pd.DataFrame:
    sub = load_submission()
    data, solution = competition_paths(rungs.competition, rungs.task)
    base = sub.parse_settings(
        ["--task", rungs.task, "--data", str(data), "--model", str(rungs.model), *rungs.script_args]
    )
    loaded = sub.DelgSavedModel(rungs.model, base.extraction)
    ladder = sub.ladder(base.extraction, ("float16", False) in loaded.batched)[:max_rungs]
    work, rows, reference = out / "work", [], None
    if reuse is not None:  # the run that extracted the reused features measured their rates
        reuse_caches(reuse, work)
        reference = load_timing(reuse / "timing.json") if (reuse / "timing.json").is_file() else None
    for index, (name, extraction) in enumerate(ladder):
        log.info("rung %d of %d: %s", index + 1, len(ladder), name)
        report = replay(
            rungs.competition,
            rungs.task,
            rungs.model,
            out / f"rung{index}",
            rungs.limit_h,
            [*rungs.script_args, *rung_flags(extraction), "--rerank", str(max(depths))],
            work=work,
        )
        if report["status"] != "ok":
            raise UserError(f"the run of rung '{name}' ended '{report['status']}'; see {out / f'rung{index}'}")
        run = read_run(work)
        reference = reference or report["timing"]
        projected_log = rung_log(report["timing"], reference, server.log)
        log_path = out / f"rung{index}" / "projected_timing.json"
        atomic_write_text(log_path, json.dumps(projected_log, indent=1))
        rows += rung_rows(
            run, Scorer(rungs.task, solution, run.test_ids), (name, extraction), projected_log, log_path, server, depths
        )
    return pd.DataFrame(rows)


def rung_rows(
    run: ExtractionRun,
    scorer: Scorer,
    rung: tuple[str, object],
    projected_log: dict,
    log_path: Path,
    server: Server,
    depths: list[int],
) -> list[dict]:
    """One row per depth: the scores, and the projection of `local_eval time --log log_path` at that depth (the
    same cost model on the same log: hours, and whether time, memory and disk all fit)."""
    name, extraction = rung
    speedup, matmul_speedup = server.factors()
    inliers = verified_inliers(run)
    rows = []
    for depth in depths:
        at_depth = np.where(np.arange(inliers.shape[1]) < depth, inliers, -1)
        scores = score_one(run, scorer, at_depth, {"rerank": depth})
        report = projection_report(projected_log, server.profile, speedup, rerank=depth, matmul_speedup=matmul_speedup)
        rows.append(
            {
                "rung": name,
                "global_scales": " ".join(map(str, extraction.global_scales())),
                "global_max_side": extraction.global_max_side,
                "precision": extraction.global_precision,
                "rerank": depth,
                **{subset: scores[subset] for subset in REPORTED_SUBSETS},
                "hours": round(report["total_hours"], 4),
                "memory_gb": round(report["memory_gb"]["peak"], 2),
                "fits": bool(report["fits"]),
                "log": str(log_path),
            }
        )
    return rows


def best_that_fits(table: pd.DataFrame) -> pd.Series | None:
    """The row with the best Public score among those that fit (the first of equals), or None."""
    best = table[table["fits"]].sort_values("public", ascending=False, kind="stable").head(1)
    return best.iloc[0] if len(best) else None


def picture(table: pd.DataFrame, task: str, profile: Profile, out: Path) -> None:
    metric = METRIC_NAME[TASK_METRIC[task]]
    series = {
        f"{rung} (depths {', '.join(map(str, part['rerank']))})": list(zip(part["hours"], part["all"], strict=True))
        for rung, part in table.groupby("rung", sort=False)
    }
    best = best_that_fits(table)
    marked = (
        None
        if best is None
        else (best["hours"], best["all"], f"best that fits (on Public): {best['rung']}, rerank {best['rerank']}")
    )
    draw.save_png(
        draw.line_chart(
            series,
            f"{task}: {metric} (all) against projected hours at full size",
            "projected server hours",
            f"{metric} (all)",
            vertical=(profile.limit_h, "limit"),
            marked=marked,
            note=None if best is not None else "nothing fits the limit",
        ),
        out / "tradeoff.png",
    )


def format_table(table: pd.DataFrame, task: str, profile: Profile, source: str) -> str:
    metric = METRIC_NAME[TASK_METRIC[task]]
    lines = [
        f"{task} tradeoff, projected to {profile.db:,} database / {profile.test:,} test images, limit "
        f"{profile.limit_h:g} h less {costs.SAFETY_MARGIN:.0%} margin ({source}):",
        f"  {'rung':<16}{'rerank':>7}  {metric + ' public':>14}{'private':>9}{'all':>8}{'hours':>9}  fits",
    ]
    for row in table.itertuples():
        lines.append(
            f"  {row.rung:<16}{row.rerank:>7}  {row.public:>14.4f}{row.private:>9.4f}{row.all:>8.4f}"
            f"{row.hours:>9.2f}  {'yes' if row.fits else 'no'}"
        )
    best = best_that_fits(table)
    lines.append(
        "  best that fits (on Public): " + (f"{best['rung']}, rerank {best['rerank']}" if best is not None else "none")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own, script_args = split_script_args(argv)
    parser = KitArgumentParser(
        prog="python -m local_eval tradeoff",
        description=__doc__.split("\n\n")[0],
        epilog="Flags after `--` go to submission/main.py in every run.",
    )
    parser.add_argument("--competition", required=True, type=Path, help="folder written by `local_eval build`")
    parser.add_argument("--task", required=True, choices=sorted(DEPTHS))
    parser.add_argument("--model", required=True, type=Path, help="exported DELG SavedModel folder")
    parser.add_argument("--out", required=True, type=Path, help="folder for tradeoff.csv, tradeoff.png and the runs")
    parser.add_argument(
        "--profile",
        default=None,
        help=f"competition to project to: {', '.join(PROFILES)} (default: the task's 2020 profile)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--log", type=Path, help="timing.json of `submission/main.py --probe` on the real server")
    source.add_argument(
        "--speedup",
        type=float,
        default=1.0,
        help="how many times faster the server runs the CNN passes than this machine",
    )
    parser.add_argument(
        "--matmul-speedup",
        type=float,
        default=1.0,
        help="how many times faster the server runs the matrix products (kNN, DBA, alpha-QE) than "
        "this machine (see `local_eval time --help`; ignored with --log)",
    )
    parser.add_argument("--depths", type=int, nargs="+", default=None, help="rerank depths to score")
    parser.add_argument(
        "--rungs", type=int, default=None, help="replay only the first N rungs of the ladder (default: all)"
    )
    parser.add_argument("--limit-h", type=float, default=2.0, help="wall-clock limit of each local run (hours)")
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="WORK folder of an earlier run of this model and competition: its cached features "
        "are linked in, not extracted again",
    )
    args = parser.parse_args(own)
    for flag in ("--speedup", "--matmul-speedup", "--limit-h"):  # NaN or inf would run a whole rung, then fail
        check_positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.rungs is not None:
        check_at_least("--rungs", args.rungs, 1)
    depths = args.depths or DEPTHS[args.task]
    if min(depths) < 0:
        raise UserError("--depths must be >= 0")
    profile = resolve_profile(args.profile or f"{args.task}-2020", {})
    if profile.task != args.task:
        raise UserError(f"--profile {args.profile} is a {profile.task} profile")
    server = load_timing(args.log) if args.log else None
    if server:
        check_log_task(server, args.log, profile, args.profile or f"{args.task}-2020")
    unmeasured = unmeasured_stages(server, profile, max(depths)) if server else []
    if unmeasured:
        raise UserError(
            f"--log {args.log}: {', '.join(unmeasured)} not measured (cached or skipped), so it cannot "
            "anchor the projection; give the timing.json of a cold run or of a probe (--probe N)"
        )
    check_not_an_input(
        "--out",
        args.out,
        [("--competition", args.competition), ("--model", args.model), ("--log", args.log), ("--reuse", args.reuse)],
        replaces_out=False,
    )
    check_writable_folder("--out", args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    rungs = Rungs(args.competition, args.task, args.model, args.limit_h, script_args)
    table = tradeoff(
        rungs, args.out, Server(profile, server, args.speedup, args.matmul_speedup), depths, args.reuse, args.rungs
    )
    source = (
        f"rates of {args.log}"
        if server
        else f"this machine's rates / {args.speedup:g} on CNN passes, / {args.matmul_speedup:g} on matrix products"
    )
    print(write_outputs(table, args.task, profile, source, args.out))
    return 0


def write_outputs(table: pd.DataFrame, task: str, profile: Profile, source: str, out: Path) -> str:
    """tradeoff.csv, tradeoff.png and tradeoff.txt (the printed table, returned)."""
    atomic_write_text(out / "tradeoff.csv", table.to_csv(index=False))
    picture(table, task, profile, out)
    text = format_table(table, task, profile, source)
    atomic_write_text(out / "tradeoff.txt", text + "\n")
    return text

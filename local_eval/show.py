"""Pictures of what the model retrieved and which local features matched.

`python -m local_eval show --competition DIR --task recognition|retrieval --submission SUB.csv --model MODEL_DIR
--out REPORT_DIR [--queries N] [-- SUBMISSION FLAGS]` writes REPORT_DIR/index.html (it opens from disk), its
PNGs and report.json: per-Usage scores, the precision-versus-rank curve (recognition), and for N queries (the
most confident wrong predictions, the lowest-ranked correct ones, a random sample) the query, its top-5
neighbours, the ground truth and the match picture of the query and its top neighbour.

`python -m local_eval show-pair IMG1 IMG2 --model MODEL_DIR --out pair.png [-- SUBMISSION FLAGS]` draws the
match picture of any two images.

Features, matches and inliers come from submission/main.py's own functions and the settings its run recorded in
WORK/settings.json (WORK: default the submission's folder/work, the replay layout), reading its caches there, so
the inliers drawn are the inliers the submission counted. Flags after `--` override the recorded settings.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from common.cli import (
    KitArgumentParser,
    UserError,
    atomic_output_dir,
    atomic_write_text,
    check_not_an_input,
    check_output_parent,
)
from local_eval import draw
from local_eval.kaggle_csv import read_solution, read_submission
from local_eval.metrics import REPORTED_SUBSETS, score_files
from local_eval.replay import competition_paths
from local_eval.submission_script import load_submission

log = logging.getLogger("show")

TOP_NEIGHBOURS = 5
CACHE_KEY_FILE = "cache_key.json"  # in WORK: what the script's feature caches were extracted with
REPORT_KIND = "show report"  # the kind of output its kit marker records
REASONS = ("most confident wrong", "lowest-ranked correct", "random sample")


def script_settings(task: str, data: Path, model: Path, flags: list[str], work: Path | None = None):
    """The submission's settings: those its run recorded in WORK/settings.json when there is one, then these
    flags, its defaults for the rest."""
    sub = load_submission()
    recorded = ["--settings", str(work / "settings.json")] if work and (work / "settings.json").is_file() else []
    try:
        return sub.parse_settings(["--task", task, "--data", str(data), "--model", str(model), *recorded, *flags])
    except SystemExit:
        raise UserError(f"cannot read the submission flags {' '.join(flags)!r} (see the message above)") from None
    except sub.InputError as err:
        raise UserError(str(err)) from None


def load_model(settings):
    """The submission's model wrapper with the submission's extraction settings."""
    sub = load_submission()
    try:
        return sub.DelgSavedModel(settings.run.model[0], settings.extraction)
    except sub.InputError as err:
        raise UserError(str(err)) from None


def attention(model, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keypoints [N,2] (y, x: box centres, as the DELG contract defines them) and attention scores [N]."""
    outputs = model(image, model.max_features)
    boxes = outputs["boxes"].reshape(-1, 4)
    return (boxes[:, :2] + boxes[:, 2:]) / 2, outputs["scores"].reshape(-1)


def pair_picture(
    model, settings, query: np.ndarray, query_features, other: np.ndarray, other_features, note: str = ""
) -> tuple[Image.Image, int, int]:
    """(match picture with attention on the query, RANSAC inliers, putative matches) of two images."""
    a, b, inliers = load_submission().ransac_matches(query_features, other_features, settings.verification)
    count = int(np.count_nonzero(inliers))
    caption = f"{count} RANSAC inliers of {len(a)} putative matches{note}"
    left = draw.attention_overlay(query, *attention(model, query))
    picture = draw.match_picture(
        left, Image.fromarray(other), query_features.keypoints, other_features.keypoints, a, b, inliers, caption
    )
    return picture, count, len(a)


@dataclass
class Extractor:
    """Images and features of a competition: the submission's caches in `work` where they are, else extracted
    into `scratch` by the submission's own functions."""

    model: object
    settings: object  # the submission's Settings
    work: Path
    scratch: Path

    def image(self, split: str, image_id: str) -> np.ndarray | None:
        """The image exactly as the submission decodes it for local features (so keypoints land right)."""
        sub, ext = load_submission(), self.settings.extraction
        return sub.decode_image(
            sub.image_path(self.settings.run.data, split, image_id), ext.max_image_side, ext.min_image_side
        )

    def local(self, split: str, image_id: str):
        sub = load_submission()
        path = sub.local_path(self.work / "local", split, image_id)
        if not path.is_file():
            sub.extract_local(
                self.model,
                self.settings.run.data,
                [(split, image_id)],
                self.scratch / "local",
                self.settings.extraction,
                self.settings.run,
            )
            path = sub.local_path(self.scratch / "local", split, image_id)
        return sub.load_local(path)

    def global_descriptors(self, split: str, wanted: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors, ok) of the wanted ids: from the submission's cache, the missing ones extracted."""
        sub = load_submission()
        ids, descriptors, ok = sub.cached_global(self.work / "global" / "m0" / split)
        found = {image_id: (d, o) for image_id, d, o in zip(ids, descriptors, ok, strict=True)}
        missing = [i for i in wanted if i not in found]
        if missing:
            cache = self.scratch / "global" / split
            paths = [sub.image_path(self.settings.run.data, split, i) for i in missing]
            sub.extract_global(self.model, missing, paths, cache, self.settings.extraction, self.settings.run)
            found.update(
                zip(
                    missing,
                    zip(*sub.load_global(cache, missing, self.settings.run.chunk_size), strict=True),
                    strict=True,
                )
            )
        return np.array([found[i][0] for i in wanted]), np.array([found[i][1] for i in wanted], bool)


# Choosing the queries
def recognition_order(predictions: dict, truth: dict) -> tuple[list[str], list[str]]:
    """(wrong predictions, most confident first; correct ones, lowest in the confidence ranking first)."""
    ranked = sorted(predictions, key=lambda q: (-predictions[q][1], q))  # the GAP order
    wrong = [q for q in ranked if predictions[q][0] not in truth[q]]
    correct = [q for q in reversed(ranked) if predictions[q][0] in truth[q]]
    return wrong, correct


def queries_to_show(predictions: dict, truth: dict, pairs: dict) -> tuple[list[str], list[str]]:
    """(queries whose first result is wrong, most inliers then cosine first; queries with a relevant result,
    the one whose first relevant result ranks lowest first)."""

    def confidence(q: str) -> tuple[float, float]:
        pair = pairs.get((q, predictions[q][0]))
        return (pair["inliers"], pair["cosine"]) if pair else (-1.0, -math.inf)

    wrong = sorted(
        (q for q in predictions if predictions[q][0] not in truth[q]),
        key=lambda q: (tuple(-x for x in confidence(q)), q),
    )
    first_hit = {q: next((r for r, i in enumerate(predictions[q][:100]) if i in truth[q]), None) for q in predictions}
    correct = sorted((q for q, r in first_hit.items() if r is not None), key=lambda q: (-first_hit[q], q))
    return wrong, correct


def choose_queries(
    wrong: list[str], low_correct: list[str], everything: list[str], n: int, seed: int
) -> list[tuple[str, str]]:
    """n (id, reason): a third most confident wrong, a third lowest-ranked correct, the rest random."""
    chosen: dict[str, str] = {}
    for reason, ids in zip(REASONS[:2], (wrong, low_correct), strict=True):
        for q in [q for q in ids if q not in chosen][: math.ceil(n / 3)]:
            chosen[q] = reason
    rest = [q for q in sorted(everything) if q not in chosen]
    for i in np.random.default_rng(seed).permutation(len(rest))[: max(0, n - len(chosen))]:
        chosen[rest[i]] = REASONS[2]
    return list(chosen.items())[:n]


def read_verified_pairs(work: Path) -> dict[tuple[str, str], dict]:
    """(query, candidate) -> {rank, cosine, inliers} from WORK/verified_pairs.csv ({} without one)."""
    path = work / "verified_pairs.csv"
    if not path.is_file():
        return {}
    frame = pd.read_csv(path, dtype={"id": str, "candidate": str})
    return {
        (row.id, row.candidate): {"rank": int(row.rank), "cosine": float(row.cosine), "inliers": int(row.inliers)}
        for row in frame.itertuples(index=False)
    }


# Building the report
@dataclass
class Competition:
    """What the report needs to know about the task's images and ground truth."""

    task: str
    test_ids: list[str]
    db_ids: list[str]
    labels: dict[str, int]  # recognition: train id -> landmark
    truth: dict[str, list]  # scored test id -> landmark ids or relevant index ids
    usage: dict[str, str]

    def is_right(self, query: str, candidate: str) -> bool:
        wanted = self.truth.get(query, [])
        return (self.labels.get(candidate) in wanted) if self.task == "recognition" else candidate in wanted

    def prediction_right(self, query: str, prediction) -> bool:
        if prediction is None:
            return False
        first = prediction[0]
        return self.is_right(query, first) if self.task == "retrieval" else first in self.truth.get(query, [])

    def truth_text(self, query: str) -> str:
        wanted = self.truth.get(query, [])
        if self.task == "retrieval":
            return f"{len(wanted)} relevant index images"
        return "landmark " + " ".join(map(str, wanted)) if wanted else "no landmark"

    def truth_example(self, query: str) -> str | None:
        """One database image that is a right answer for the query."""
        return next((c for c in self.db_ids if self.is_right(query, c)), None)


def read_competition(task: str, data: Path, solution_path: Path) -> Competition:
    sub = load_submission()
    solution = read_solution(solution_path, task)
    truth = {q: t for subset in solution.subsets.values() for q, t in subset.items()}
    usage = {q: name for name, subset in solution.subsets.items() for q in subset}
    if task == "recognition":
        db_ids, labels = sub.read_train_labels(data)
        labels_of = dict(zip(db_ids, labels.tolist(), strict=True))
    else:
        db_ids, labels_of = sub.list_image_ids(data / "index"), {}
    return Competition(task, sub.read_test_ids(data), db_ids, labels_of, truth, usage)


def global_ranking(
    queries: np.ndarray, database: np.ndarray, ok: np.ndarray, stage, block_mb: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rankings [nq, n] of every database row, best first; scores [nq, n_ok] of the readable rows): the
    script's global stage over the readable rows (whitening fitted on them, DBA, exact kNN, alpha-QE, SuperGlobal,
    as its settings ask), then the unreadable ones (logged by the extractor) last."""
    sub = load_submission()
    readable = np.flatnonzero(ok)
    db, queries = sub.whitened(stage, database[readable], queries.copy())
    cosines, found, _ = sub.global_chain(queries, db, len(readable), stage, block_mb)
    unreadable = np.broadcast_to(np.flatnonzero(~ok), (len(queries), len(ok) - len(readable)))
    return np.concatenate([readable[found], unreadable], axis=1), cosines


def top_neighbours(
    extractor: Extractor, comp: Competition, queries: list[str], predictions: dict
) -> dict[str, list[tuple[str, float | None]]]:
    """Per query its top-5 (id, cosine), the cosines as the submission's global stage searched them (its database
    whitening included): in that search's order for recognition, the submitted order for retrieval."""
    db_split, query_split = load_submission().IMAGE_SPLITS[comp.task]
    query_desc, query_ok = extractor.global_descriptors(query_split, queries)
    db_desc, db_ok = extractor.global_descriptors(db_split, comp.db_ids)
    settings = extractor.settings
    rankings, scores = global_ranking(query_desc, db_desc, db_ok, settings.global_stage, settings.run.knn_block_mb)
    result = {}
    for q, ok, ranking, score in zip(queries, query_ok, rankings, scores, strict=True):
        cosine_of = {comp.db_ids[j]: float(s) for j, s in zip(ranking, score, strict=False)}
        ranked = (
            [comp.db_ids[j] for j in ranking[:TOP_NEIGHBOURS]]
            if comp.task == "recognition"
            else predictions.get(q, [])[:TOP_NEIGHBOURS]
        )
        result[q] = [(c, cosine_of.get(c)) for c in ranked] if ok else []
    return result


def thumbnail_file(extractor: Extractor, split: str, image_id: str, out: Path) -> str:
    """Save a thumbnail of the image into out/thumbs once; its path relative to out."""
    relative = f"thumbs/{split}_{image_id}.png"
    if not (out / relative).is_file():
        draw.save_png(draw.thumbnail(extractor.image(split, image_id)), out / relative)
    return relative


def match_view(
    extractor: Extractor, comp: Competition, query: str, candidate: str, pairs: dict, out: Path
) -> dict | None:
    """Draw the match picture of a query and a candidate; its file, drawn inliers and the submission's."""
    db_split, query_split = load_submission().IMAGE_SPLITS[comp.task]
    query_image, other_image = extractor.image(query_split, query), extractor.image(db_split, candidate)
    if query_image is None or other_image is None:
        return None
    submitted = pairs.get((query, candidate), {}).get("inliers")
    note = "" if submitted is None else f" (the submission counted {submitted})"
    picture, inliers, putative = pair_picture(
        extractor.model,
        extractor.settings,
        query_image,
        extractor.local(query_split, query),
        other_image,
        extractor.local(db_split, candidate),
        note,
    )
    if submitted is not None and submitted != inliers:
        log.warning(
            "%s / %s: %d inliers drawn, the submission counted %d: was it run with other settings?",
            query,
            candidate,
            inliers,
            submitted,
        )
    relative = f"matches/{query}_{candidate}.png"
    draw.save_png(picture, out / relative)
    return {
        "candidate": candidate,
        "picture": relative,
        "inliers": inliers,
        "putative": putative,
        "submission_inliers": submitted,
    }


def prediction_text(task: str, prediction) -> str:
    if prediction is None:
        return "nothing predicted"
    if task == "recognition":
        return f"landmark {prediction[0]} (confidence {prediction[1]:.4f})"
    return f"{len(prediction)} index images"


def query_view(
    extractor: Extractor,
    comp: Competition,
    query: str,
    reason: str,
    predictions: dict,
    neighbours: list[tuple[str, float | None]],
    pairs: dict,
    out: Path,
) -> dict:
    db_split, query_split = load_submission().IMAGE_SPLITS[comp.task]
    shown = [
        {
            "id": c,
            "rank": rank,
            "cosine": cosine,
            "right": comp.is_right(query, c),
            "landmark": comp.labels.get(c),
            "inliers": pairs.get((query, c), {}).get("inliers"),
            "thumbnail": thumbnail_file(extractor, db_split, c, out),
        }
        for rank, (c, cosine) in enumerate(neighbours, 1)
    ]
    example = comp.truth_example(query)
    return {
        "id": query,
        "reason": reason,
        "usage": comp.usage.get(query, ""),
        "prediction": prediction_text(comp.task, predictions.get(query)),
        "correct": comp.prediction_right(query, predictions.get(query)),
        "truth": comp.truth_text(query),
        "thumbnail": thumbnail_file(extractor, query_split, query, out),
        "truth_thumbnail": example and thumbnail_file(extractor, db_split, example, out),
        "neighbours": shown,
        "match": match_view(extractor, comp, query, neighbours[0][0], pairs, out) if neighbours else None,
    }


def curve_file(predictions: dict, truth: dict, gap: float | None, out: Path) -> str:
    """Draw the precision-versus-rank curve of the scored recognition predictions; its relative path."""
    scored = {q: p for q, p in predictions.items() if q in truth}
    ranked = sorted(scored, key=lambda q: (-scored[q][1], q))
    correct = np.array([scored[q][0] in truth[q] for q in ranked], bool)
    title = f"precision at each rank of the confidence-sorted predictions (GAP {_number(gap)})"
    draw.save_png(draw.precision_curve(correct, title), out / "gap_curve.png")
    return "gap_curve.png"


def work_folder(args: argparse.Namespace) -> Path:
    return args.work or args.submission.parent / "work"


def check_work_model(work: Path, model: Path) -> None:
    """WORK's cached features must be --model's: WORK/cache_key.json names the models (and their files' sizes and
    times) the run extracted them with; another model's WORK is a UserError naming both."""
    path = work / CACHE_KEY_FILE
    if not path.is_file():
        return
    try:
        keys = json.loads(path.read_text())
        recorded = [*keys["global"]["models"], keys["local"]]
        used = {entry["model"]: entry["files"] for entry in recorded}
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a cache key the submission wrote ({type(err).__name__}: {err})") from None
    model = Path(model).resolve()
    if str(model) not in used:
        raise UserError(
            f"--model {model}: {path} says WORK's features come from {', '.join(sorted(used))}; pass "
            "that --model, or the --work of a run of this model"
        )
    for name, (size, mtime_ns) in used[str(model)].items():
        stat = (model / name).stat() if (model / name).is_file() else None
        if stat is None or (stat.st_size, stat.st_mtime_ns) != (size, mtime_ns):
            raise UserError(
                f"--model {model}: its {name} changed since {path} was written, so WORK's features "
                "are an older model's; rerun the submission on this model first"
            )


def build_report(args: argparse.Namespace, out: Path, scratch: Path) -> dict:
    data, solution_path = competition_paths(args.competition, args.task)
    scores = score_files(args.task, solution_path, args.submission)
    comp = read_competition(args.task, data, solution_path)
    predictions = read_submission(args.submission, args.task, read_solution(solution_path, args.task))
    work = work_folder(args)
    if not work.is_dir():
        log.warning("no submission work folder %s: features are recomputed, inliers cannot be compared", work)
    pairs = read_verified_pairs(work)
    order = (
        recognition_order(predictions, comp.truth)
        if args.task == "recognition"
        else queries_to_show(predictions, comp.truth, pairs)
    )
    chosen = choose_queries(*order, list(comp.truth), args.queries, args.seed)
    settings = script_settings(args.task, data, args.model, args.script_args, work)
    extractor = Extractor(load_model(settings), settings, work, scratch)
    neighbours = top_neighbours(extractor, comp, [q for q, _ in chosen], predictions)
    views = [
        query_view(extractor, comp, q, reason, predictions, neighbours[q], pairs, out)
        for q, reason in tqdm(chosen, desc="show", unit="query")
    ]
    curve = curve_file(predictions, comp.truth, scores["all"]["gap"], out) if args.task == "recognition" else None
    return {
        "task": args.task,
        "submission": str(args.submission),
        "model": str(args.model),
        "scores": scores,
        "curve": curve,
        "queries": views,
    }


# The page
PAGE_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table.scores td, table.scores th { padding: 0.2em 0.7em; text-align: right; border-bottom: 1px solid #ddd; }
section { border-top: 2px solid #888; margin-top: 1.5em; padding-top: 0.5em; }
.row { display: flex; flex-wrap: wrap; gap: 10px; align-items: flex-start; }
figure { margin: 0; font-size: 12px; text-align: center; max-width: 170px; }
figure img { border: 4px solid #bbb; display: block; margin: auto; }
figure.right img { border-color: #2a2; }
figure.wrong img { border-color: #d33; }
figure.match { max-width: none; }
figure.match img { border: none; }
.reason { color: #a50; font-weight: bold; }
"""


def _number(value: float | int | None) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def scores_table(scores: dict) -> str:
    metrics = [k for k in scores["all"] if k != "n"] + ["n"]
    head = "".join(f"<th>{html.escape(m)}</th>" for m in metrics)
    rows = "".join(
        f"<tr><th>{subset}</th>" + "".join(f"<td>{_number(scores[subset][m])}</td>" for m in metrics) + "</tr>"
        for subset in REPORTED_SUBSETS
    )
    return f'<table class="scores"><tr><th>Usage</th>{head}</tr>{rows}</table>'


def figure(src: str, caption: str, css_class: str = "") -> str:
    """An image with a caption (HTML) under it."""
    alt = html.escape(re.sub(r"<[^>]+>", " ", caption), quote=True)
    return (
        f'<figure class="{css_class}"><img src="{html.escape(src)}" alt="{alt}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def neighbour_caption(item: dict) -> str:
    label = f"landmark {item['landmark']}<br>" if item["landmark"] is not None else ""
    inliers = "not verified" if item["inliers"] is None else f"{item['inliers']} inliers"
    mark = "right" if item["right"] else "wrong"
    return f"#{item['rank']} {mark}<br>{label}cosine {_number(item['cosine'])} · {inliers}"


def query_section(view: dict) -> str:
    figures = [figure(view["thumbnail"], f"query {html.escape(view['id'])}")]
    figures += [
        figure(n["thumbnail"], neighbour_caption(n), "right" if n["right"] else "wrong") for n in view["neighbours"]
    ]
    if view["truth_thumbnail"]:
        figures.append(figure(view["truth_thumbnail"], "a right answer (ground truth)", "right"))
    match = view["match"]
    match_html = (
        figure(
            match["picture"],
            f"query and its top neighbour {html.escape(match['candidate'])}: "
            f"{match['inliers']} inliers of {match['putative']} putative matches; "
            "attention on the query",
            "match",
        )
        if match
        else "<p>no match picture (an image is unreadable or nothing was retrieved)</p>"
    )
    return (
        f"<section><h2>{html.escape(view['id'])} <span class='reason'>{view['reason']}</span></h2>"
        f"<p>Usage {view['usage']} · prediction: {html.escape(view['prediction'])} · ground truth: "
        f"{html.escape(view['truth'])} · prediction {'right' if view['correct'] else 'wrong'}</p>"
        f"<div class='row'>{''.join(figures)}</div>{match_html}</section>"
    )


def render_html(report: dict) -> str:
    curve = f'<h2>Precision versus rank</h2><img src="{report["curve"]}" alt="GAP curve">' if report["curve"] else ""
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{report['task']} report</title>"
        f"<style>{PAGE_STYLE}</style></head><body><h1>{report['task']}: {html.escape(report['submission'])}</h1>"
        f"<p>model {html.escape(report['model'])}</p>{scores_table(report['scores'])}{curve}"
        + "".join(query_section(view) for view in report["queries"])
        + "</body></html>\n"
    )


# Commands
def parse_with_script_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse the command's own flags; what follows `--` is kept, as script_args, for the submission's parser."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser.epilog = (
        "Flags after `--` are the submission script's (scales, features, RANSAC); they override the "
        "settings the run recorded in WORK/settings.json."
    )
    args = parser.parse_args(argv[:split])
    args.script_args = argv[split + 1 :]
    return args


def parse_show_args(argv: list[str] | None) -> argparse.Namespace:
    p = KitArgumentParser(prog="python -m local_eval show", description=__doc__.split("\n\n")[1])
    p.add_argument("--competition", required=True, type=Path, help="folder written by `local_eval build`")
    p.add_argument(
        "--task", required=True, choices=["recognition", "retrieval"], help="which competition of the folder"
    )
    p.add_argument("--submission", required=True, type=Path, help="the submission.csv to look at")
    p.add_argument("--model", required=True, type=Path, help="the DELG SavedModel folder the submission used")
    p.add_argument("--out", required=True, type=Path, help="report folder to write (index.html, PNGs, report.json)")
    p.add_argument("--queries", type=int, default=12, help="how many queries to show (default 12)")
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="the submission's WORK folder (caches, verified_pairs.csv); default: SUBMISSION's folder/work",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random sample of queries (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    return parse_with_script_flags(p, argv)


def main_show(argv: list[str] | None = None) -> int:
    args = parse_show_args(argv)
    if not args.submission.is_file():
        raise UserError(f"{args.submission}: submission file not found")
    if args.queries < 1:
        raise UserError(f"--queries must be at least 1, got {args.queries}")
    check_not_an_input(
        "--out",
        args.out,
        [
            ("--competition", args.competition),
            ("--submission", args.submission),
            ("--model", args.model),
            ("--work", work_folder(args)),
        ],
    )
    check_work_model(work_folder(args), args.model)
    with atomic_output_dir(args.out, args.overwrite, kind=REPORT_KIND) as out, tempfile.TemporaryDirectory() as scratch:
        report = build_report(args, out, Path(scratch))
        atomic_write_text(out / "report.json", json.dumps(report, indent=1) + "\n")
        atomic_write_text(out / "index.html", render_html(report))
    print(f"report of {len(report['queries'])} queries: {args.out / 'index.html'}")
    return 0


def parse_pair_args(argv: list[str] | None) -> argparse.Namespace:
    p = KitArgumentParser(
        prog="python -m local_eval show-pair",
        description="Draw the local-feature matches of two images (attention on IMG1).",
    )
    p.add_argument("image1", type=Path, help="first image (the query: its attention is drawn)")
    p.add_argument("image2", type=Path, help="second image")
    p.add_argument("--model", required=True, type=Path, help="DELG SavedModel folder")
    p.add_argument("--out", required=True, type=Path, help="PNG file to write")
    return parse_with_script_flags(p, argv)


def main_show_pair(argv: list[str] | None = None) -> int:
    args = parse_pair_args(argv)
    check_not_an_input("--out", args.out, [("IMG1", args.image1), ("IMG2", args.image2), ("--model", args.model)])
    if args.out.is_dir():
        raise UserError(f"--out {args.out}: a folder; give the path of the PNG file to write")
    check_output_parent(args.out)  # before the model's seconds, not after
    settings = script_settings("retrieval", Path("."), args.model, args.script_args)
    sub, ext = load_submission(), settings.extraction
    images = [sub.decode_image(path, ext.max_image_side, ext.min_image_side) for path in (args.image1, args.image2)]
    for path, image in zip((args.image1, args.image2), images, strict=True):
        if image is None:
            raise UserError(f"{path}: not a readable image")
    model = load_model(settings)
    features = []
    for image in images:
        found = model.local_features(image)  # descriptors rounded to float16, as the cache stores them
        features.append(found._replace(descriptors=found.descriptors.astype(np.float16).astype(np.float32)))
    picture, inliers, putative = pair_picture(model, settings, images[0], features[0], images[1], features[1])
    draw.save_png(picture, args.out)
    print(f"{inliers} RANSAC inliers of {putative} putative matches: {args.out}")
    return 0

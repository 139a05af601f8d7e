"""`local_eval show` and `show-pair` on the tiny competition, after a real run of the submission script."""

from __future__ import annotations

import json
import os
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cli import run_main
from local_eval import draw
from local_eval.show import (
    Competition,
    choose_queries,
    main_show,
    main_show_pair,
    queries_to_show,
    recognition_order,
    top_neighbours,
)
from local_eval.submission_script import load_submission
from tests import HANG_GUARD_S
from tests.delg_test_models import write_tf2_model

sub = load_submission()
SCRIPT_FLAGS = [
    "--scales",
    "0.5",
    "1.0",
    "--global-scale-indices",
    "0",
    "1",
    "--max-features",
    "200",
    "--warmup-queries",
    "4",
    "--rerank-batch",
    "40",
    "--ransac-threshold-px",
    "4",
    "--workers",
    "0",
]
QUERIES = 6
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def model_dir(request, tmp_path_factory) -> Path:
    """The real tiny exported DELG model when training is available, else the TF2 test model."""
    try:
        from train.loop import train  # noqa: F401
    except ImportError:
        return write_tf2_model(tmp_path_factory.mktemp("show_model") / "tf2")
    return request.getfixturevalue("tiny_model")


@pytest.fixture(scope="module")
def run_folder(tiny_competition, model_dir, tmp_path_factory) -> Path:
    """submission.csv and work/ of the submission script on the tiny recognition task (the replay layout)."""
    folder = tmp_path_factory.mktemp("show_run")
    assert (
        sub.main(
            [
                "--task",
                "recognition",
                "--data",
                str(tiny_competition / "landmark-recognition"),
                "--model",
                str(model_dir),
                "--out",
                str(folder / "submission.csv"),
                "--work",
                str(folder / "work"),
                *SCRIPT_FLAGS,
            ]
        )
        == 0
    )
    return folder


@pytest.fixture(scope="module")
def report_dir(run_folder, tiny_competition, model_dir) -> Path:
    out = run_folder / "report"
    assert (
        main_show(
            [
                "--competition",
                str(tiny_competition),
                "--task",
                "recognition",
                "--submission",
                str(run_folder / "submission.csv"),
                "--model",
                str(model_dir),
                "--out",
                str(out),
                "--queries",
                str(QUERIES),
                "--",
                *SCRIPT_FLAGS,
            ]
        )
        == 0
    )
    return out


class Sources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.sources += [value for name, value in attrs if name in ("src", "href")]


def test_page_references_only_files_that_exist_and_decode(report_dir):
    parser = Sources()
    parser.feed((report_dir / "index.html").read_text())
    assert len(parser.sources) >= QUERIES + 1  # every query's thumbnail, at least, and the GAP curve
    for source in parser.sources:
        path = report_dir / source
        assert not Path(source).is_absolute() and path.resolve().is_relative_to(report_dir.resolve()), source
        with Image.open(path) as image:
            image.load()
            assert image.width > 10 and image.height > 10, source
    assert "gap_curve.png" in parser.sources


def test_report_shows_the_chosen_queries_with_neighbours_and_scores(report_dir, run_folder, tiny_competition):
    report = json.loads((report_dir / "report.json").read_text())
    assert len(report["queries"]) == QUERIES
    submission = pd.read_csv(run_folder / "submission.csv", dtype=str, keep_default_na=False)
    solution = pd.read_csv(tiny_competition / "solutions" / "recognition_solution.csv", dtype=str)
    scored = set(solution.loc[solution["Usage"] != "Ignored", "id"])
    assert {view["id"] for view in report["queries"]} <= scored
    predicted = dict(zip(submission["id"], submission["landmarks"], strict=True))
    for view in report["queries"]:
        if view["reason"] == "most confident wrong":
            assert not view["correct"] and predicted[view["id"]]
        if view["reason"] == "lowest-ranked correct":
            assert view["correct"]
        assert len(view["neighbours"]) in (0, 5)
    page = (report_dir / "index.html").read_text()
    assert f"{report['scores']['public']['gap']:.4f}" in page and "private" in page


def test_drawn_inliers_equal_the_submissions(report_dir, run_folder):
    report = json.loads((report_dir / "report.json").read_text())
    pairs = pd.read_csv(run_folder / "work" / "verified_pairs.csv", dtype={"id": str, "candidate": str})
    submitted = {(r.id, r.candidate): r.inliers for r in pairs.itertuples()}
    matches = [(view["id"], view["match"]) for view in report["queries"] if view["match"]]
    assert matches
    page = (report_dir / "index.html").read_text()
    for query, match in matches:
        assert match["submission_inliers"] == submitted[(query, match["candidate"])]
        assert match["inliers"] == match["submission_inliers"], (query, match)
        assert f"{match['inliers']} inliers of {match['putative']} putative matches" in page
        with Image.open(report_dir / match["picture"]) as picture:
            assert picture.width > picture.height  # side by side


def test_show_pair_draws_the_match_of_two_images(tmp_path, tiny_competition, model_dir, capsys):
    data = tiny_competition / "landmark-recognition"
    train = pd.read_csv(data / "train.csv", dtype={"id": str})
    first, second = train[train["landmark_id"] == train["landmark_id"].mode()[0]]["id"][:2]
    paths = [str(sub.image_path(data, "train", i)) for i in (first, second)]
    out = tmp_path / "pair.png"
    assert run_main(main_show_pair, [*paths, "--model", str(model_dir), "--out", str(out), "--", *SCRIPT_FLAGS]) == 0
    inliers = int(re.match(r"(\d+) RANSAC inliers", capsys.readouterr().out).group(1))
    settings = sub.parse_settings(["--task", "retrieval", "--data", ".", "--model", str(model_dir), *SCRIPT_FLAGS])
    model = sub.DelgSavedModel(model_dir, settings.extraction)
    features = []
    for path in paths:
        found = model.local_features(
            sub.decode_image(Path(path), settings.extraction.max_image_side, settings.extraction.min_image_side)
        )
        features.append(found._replace(descriptors=found.descriptors.astype(np.float16).astype(np.float32)))
    assert inliers == sub.count_inliers(*features, settings.verification)
    with Image.open(out) as picture:
        assert picture.width > picture.height


def test_bad_input_is_one_clear_error(tmp_path, tiny_competition, model_dir, capsys):
    missing = tmp_path / "nothing.csv"
    assert (
        run_main(
            main_show,
            [
                "--competition",
                str(tiny_competition),
                "--task",
                "recognition",
                "--submission",
                str(missing),
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "r"),
            ],
        )
        == 2
    )
    assert str(missing) in capsys.readouterr().err
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"not an image")
    assert (
        run_main(
            main_show_pair, [str(garbage), str(garbage), "--model", str(model_dir), "--out", str(tmp_path / "p.png")]
        )
        == 2
    )
    assert f"{garbage}: not a readable image" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "p.png").exists()


def test_queries_are_the_most_confident_wrong_the_lowest_correct_and_random():
    truth = {"a": [1], "b": [1], "c": [2], "d": [], "e": [3], "f": [3], "g": [1]}
    predictions = {"a": (1, 0.9), "b": (2, 0.8), "c": (2, 0.1), "d": (5, 0.95), "e": (3, 0.5), "f": (1, 0.2)}
    wrong, correct = recognition_order(predictions, truth)
    assert wrong == ["d", "b", "f"] and correct == ["c", "e", "a"]
    chosen = choose_queries(wrong, correct, list(truth), 6, seed=0)
    assert chosen[:4] == [
        ("d", "most confident wrong"),
        ("b", "most confident wrong"),
        ("c", "lowest-ranked correct"),
        ("e", "lowest-ranked correct"),
    ]
    assert len({q for q, _ in chosen}) == 6 and {r for _, r in chosen[4:]} == {"random sample"}
    ranked = {"x": ["i1", "i2", "i3"], "y": ["i3", "i1"], "z": ["i4", "i5"]}
    pairs = {("y", "i3"): {"inliers": 9, "cosine": 0.5}, ("z", "i4"): {"inliers": 30, "cosine": 0.4}}
    wrong, correct = queries_to_show(ranked, {"x": ["i1"], "y": ["i1"], "z": ["i9"]}, pairs)
    assert wrong == ["z", "y"] and correct == ["y", "x"]


def test_match_picture_draws_inliers_bright_and_rejected_matches_faint():
    left, right = Image.new("RGB", (80, 60), (0, 0, 0)), Image.new("RGB", (60, 60), (0, 0, 0))
    keypoints = np.array([[10, 10], [30, 40], [50, 20]], np.float32)
    order = np.arange(3)
    bright = lambda picture: np.all(np.asarray(picture) == draw.INLIER_COLOUR[:3], axis=-1).sum()
    with_inliers = draw.match_picture(
        left, right, keypoints, keypoints, order, order, np.array([True, True, False]), "2 inliers"
    )
    rejected_only = draw.match_picture(left, right, keypoints, keypoints, order, order, np.zeros(3, bool), "0")
    assert bright(with_inliers) > 100 and bright(rejected_only) == 0
    assert np.asarray(rejected_only)[draw.CAPTION_HEIGHT :].max() > 0  # faint lines, still visible
    heat = draw.attention_overlay(np.zeros((64, 64, 3), np.uint8), keypoints, np.array([1.0, 0.5, 0.1]))
    assert np.asarray(heat)[10, 10].sum() > np.asarray(heat)[60, 60].sum()


def test_page_renders_in_headless_chromium(report_dir, tmp_path):
    if not CHROMIUM.is_file():
        message = f"{CHROMIUM} is not installed (`make install` brings Debian's chromium): the page was not rendered"
        if os.environ.get("CI", "").lower() in ("true", "1"):
            pytest.fail(f"{message}; in CI this test must run")
        pytest.skip(message)
    screenshot = tmp_path / "page.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={screenshot}",
            "--window-size=1200,1600",
            (report_dir / "index.html").resolve().as_uri(),
        ],
        check=True,
        timeout=HANG_GUARD_S,
        capture_output=True,
    )
    pixels = np.asarray(Image.open(screenshot).convert("L"), float)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50  # text, thumbnails and pictures, not a blank page


def test_retrieval_report_draws_the_submitted_first_result(tiny_competition, model_dir, tmp_path):
    flags = [*SCRIPT_FLAGS, "--rerank", "2"]
    assert (
        sub.main(
            [
                "--task",
                "retrieval",
                "--data",
                str(tiny_competition / "landmark-retrieval"),
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "submission.csv"),
                "--work",
                str(tmp_path / "work"),
                *flags,
            ]
        )
        == 0
    )
    assert (
        main_show(
            [
                "--competition",
                str(tiny_competition),
                "--task",
                "retrieval",
                "--submission",
                str(tmp_path / "submission.csv"),
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "report"),
                "--queries",
                "3",
                "--",
                *flags,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    submission = pd.read_csv(tmp_path / "submission.csv", dtype=str, keep_default_na=False)
    submitted = dict(zip(submission["id"], submission["images"].str.split(), strict=True))
    assert report["curve"] is None and len(report["queries"]) == 3
    for view in report["queries"]:
        assert [n["id"] for n in view["neighbours"]] == submitted[view["id"]][:5]
        assert view["match"]["inliers"] == view["match"]["submission_inliers"]


def test_without_the_work_folder_features_are_recomputed_to_the_same_inliers(
    run_folder, tiny_competition, model_dir, tmp_path
):
    assert (
        main_show(
            [
                "--competition",
                str(tiny_competition),
                "--task",
                "recognition",
                "--submission",
                str(run_folder / "submission.csv"),
                "--model",
                str(model_dir),
                "--out",
                str(tmp_path / "report"),
                "--queries",
                "2",
                "--work",
                str(tmp_path / "none"),
                "--",
                *SCRIPT_FLAGS,
            ]
        )
        == 0
    )
    pairs = pd.read_csv(run_folder / "work" / "verified_pairs.csv", dtype={"id": str, "candidate": str})
    submitted = {(r.id, r.candidate): r.inliers for r in pairs.itertuples()}
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    for view in report["queries"]:
        assert view["match"]["submission_inliers"] is None  # no verified_pairs.csv was given
        assert view["match"]["inliers"] == submitted[(view["id"], view["match"]["candidate"])]


def test_recognition_neighbours_are_those_the_submission_searched():
    """A query's top neighbours in the order of the script's global stage (its database whitening), whose top
    candidates it verified; not by the cached descriptors' raw cosine."""
    rng = np.random.default_rng(0)
    descriptors = {split: rng.normal(size=(n, 16)).astype(np.float32) + 3 for split, n in (("test", 6), ("train", 40))}
    for rows in descriptors.values():
        rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    ids = {split: [f"{split}{i}" for i in range(len(rows))] for split, rows in descriptors.items()}
    stage = sub.Global()
    settings = SimpleNamespace(global_stage=stage, run=SimpleNamespace(knn_block_mb=64))
    extractor = SimpleNamespace(
        settings=settings, global_descriptors=lambda split, wanted: (descriptors[split], np.ones(len(wanted), bool))
    )
    comp = Competition("recognition", ids["test"], ids["train"], {}, {}, {})
    found = top_neighbours(extractor, comp, ids["test"], {})
    whitening = sub.fit_whitening(descriptors["train"], stage.whiten_shrinkage)
    db, queries = (sub.apply_whitening(rows.copy(), whitening) for rows in (descriptors["train"], descriptors["test"]))
    cosines, rows = sub.knn(queries, db, 5, 64)
    assert [[c for c, _ in found[q]] for q in ids["test"]] == [[ids["train"][j] for j in row] for row in rows]
    np.testing.assert_allclose([[s for _, s in found[q]] for q in ids["test"]], cosines, rtol=1e-5)
    raw = sub.knn(descriptors["test"], descriptors["train"], 5, 64)[1]
    assert (raw != rows).any()  # the whitening changed some order

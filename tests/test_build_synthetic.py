"""The synthetic competition: Kaggle layout, consistent solutions, determinism, safe output handling."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pandas as pd
import pytest
import tensorflow as tf

from common.cli import UserError, run_main
from common.gldv2 import image_path
from local_eval import synthetic
from local_eval.build import main as build_main
from local_eval.synthetic import SIZES, build_synthetic, plan_competition

HEADERS = {
    "landmark-recognition/train.csv": "id,landmark_id",
    "landmark-recognition/sample_submission.csv": "id,landmarks",
    "landmark-retrieval/sample_submission.csv": "id,images",
    "solutions/recognition_solution.csv": "id,landmarks,Usage",
    "solutions/retrieval_solution.csv": "id,images,Usage",
}


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_csv_headers(tiny_competition):
    for name, header in HEADERS.items():
        assert (tiny_competition / name).read_text().splitlines()[0] == header, name
    for folder in ("landmark-recognition/train", "landmark-recognition/test", "landmark-retrieval/index",
                   "landmark-retrieval/test"):
        files = list((tiny_competition / folder).rglob("*"))
        assert all(re.fullmatch(r"[0-9a-f]{3}", "".join(p.relative_to(tiny_competition / folder).parts[:3]))
                   for p in files if p.is_file())


def test_every_listed_id_is_a_decodable_image(tiny_competition):
    recognition, retrieval = tiny_competition / "landmark-recognition", tiny_competition / "landmark-retrieval"
    listed = [(recognition, "train", i) for i in read(recognition / "train.csv").id]
    listed += [(recognition, "test", i) for i in read(tiny_competition / "solutions/recognition_solution.csv").id]
    listed += [(retrieval, "test", i) for i in read(tiny_competition / "solutions/retrieval_solution.csv").id]
    ids = [i for _, _, i in listed]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    on_disk = {p for p in tiny_competition.rglob("*.jpg")}
    listed_paths = {image_path(root, split, i) for root, split, i in listed}
    assert listed_paths <= on_disk
    channels = set()
    for path in sorted(on_disk):
        image = tf.io.decode_image(path.read_bytes(), expand_animations=False)
        assert image.shape[0] >= 48 and image.shape[1] >= 48, path
        channels.add(int(image.shape[2]))
    assert channels <= {1, 3} and 3 in channels


def test_sample_submissions_list_the_test_ids(tiny_competition):
    solutions = tiny_competition / "solutions"
    for task, column in (("recognition", "landmarks"), ("retrieval", "images")):
        sample = read(tiny_competition / f"landmark-{task}" / "sample_submission.csv")
        assert sorted(sample.id) == sorted(read(solutions / f"{task}_solution.csv").id)
        assert set(sample[column]) == {""}


def test_recognition_solution_nonlandmark_share_and_usage(tiny_competition):
    solution = read(tiny_competition / "solutions/recognition_solution.csv")
    train = read(tiny_competition / "landmark-recognition/train.csv")
    assert (solution.landmarks == "").mean() == pytest.approx(0.7, abs=0.02)
    train_counts = train.landmark_id.value_counts()
    test_landmarks = solution.landmarks[solution.landmarks != ""]
    assert all(train_counts.get(lm, 0) >= synthetic.MIN_TRAIN_FOR_TEST for lm in test_landmarks)
    scored = solution[solution.Usage != "Ignored"]
    assert 0 < (solution.Usage == "Ignored").sum() < 0.1 * len(solution)
    assert (scored.Usage == "Public").mean() == pytest.approx(1 / 3, abs=0.05)
    assert set(scored.Usage) == {"Public", "Private"}


def test_train_counts_have_a_long_tail(tiny_competition):
    counts = read(tiny_competition / "landmark-recognition/train.csv").landmark_id.value_counts()
    assert counts.min() <= 3 and counts.max() >= 5 * counts.median()


def test_retrieval_solution_lists_every_index_image_of_the_query_landmark(tiny_competition):
    rows = plan_competition(SIZES["tiny"], seed=0, nonlandmark_share=0.7)
    landmark_of = {r.image_id: r.landmark for r in rows}
    index_ids = {r.image_id for r in rows if r.split == "index"}
    on_disk = {p.stem for p in (tiny_competition / "landmark-retrieval/index").rglob("*.jpg")}
    assert on_disk == index_ids
    solution = read(tiny_competition / "solutions/retrieval_solution.csv")
    assert set(solution.images[solution.Usage == "Ignored"]) == {"None"}
    scored = solution[solution.Usage != "Ignored"]
    assert len(scored) > 0.8 * len(solution)
    for query, images in zip(scored.id, scored.images, strict=True):
        expected = {i for i in index_ids if landmark_of[i] == landmark_of[query]}
        assert set(images.split()) == expected and expected


def test_test_views_are_never_train_views(tiny_competition):
    train = {hashlib.sha256(p.read_bytes()).digest()
             for p in (tiny_competition / "landmark-recognition/train").rglob("*.jpg")}
    others = [p for split in ("landmark-recognition/test", "landmark-retrieval/index", "landmark-retrieval/test")
              for p in (tiny_competition / split).rglob("*.jpg")]
    assert not any(hashlib.sha256(p.read_bytes()).digest() in train for p in others)


def test_same_seed_same_bytes_in_parallel_and_other_seed_differs(tiny_competition, tmp_path):
    again = build_synthetic(tmp_path / "again", size="tiny", seed=0, workers=2)
    assert tree_digest(again) == tree_digest(tiny_competition)
    other = build_synthetic(tmp_path / "other", size="tiny", seed=1)
    train_csv = "landmark-recognition/train.csv"
    assert (other / train_csv).read_text() != (tiny_competition / train_csv).read_text()


def test_existing_output_same_build_is_kept_other_build_is_an_error(tiny_competition, tmp_path):
    before = tree_digest(tiny_competition)
    assert build_synthetic(tiny_competition, size="tiny", seed=0) == tiny_competition
    assert tree_digest(tiny_competition) == before
    with pytest.raises(UserError, match="different competition"):
        build_synthetic(tiny_competition, size="tiny", seed=3)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    with pytest.raises(UserError, match="already exists"):
        build_synthetic(stranger, size="tiny")
    with pytest.raises(UserError, match="unknown size"):
        build_synthetic(tmp_path / "x", size="huge")


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "render_view", broken)
    with pytest.raises(OSError):
        build_synthetic(tmp_path / "out", size="tiny", workers=1)
    assert list(tmp_path.iterdir()) == []


def test_command_prints_summary_and_rejects_bad_input(tiny_competition, tmp_path, capsys):
    assert run_main(build_main, ["synthetic", "--size", "tiny", "--seed", "0", "--out", str(tiny_competition)]) == 0
    out = capsys.readouterr().out
    assert "train images per landmark" in out and "Public" in out
    assert run_main(build_main, ["synthetic", "--seed", "5", "--out", str(tiny_competition)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert run_main(build_main, ["synthetic", "--nonlandmark-share", "1.5", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()

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
from local_eval.layout import nonlandmark_folder, task_folder
from local_eval.synthetic import SIZES, build_synthetic, plan_competition, plan_nonlandmark

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
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_csv_headers(tiny_competition):
    for name, header in HEADERS.items():
        assert (tiny_competition / name).read_text().splitlines()[0] == header, name
    for folder in (
        "landmark-recognition/train",
        "landmark-recognition/test",
        "landmark-retrieval/index",
        "landmark-retrieval/test",
    ):
        files = list((tiny_competition / folder).rglob("*"))
        assert all(
            re.fullmatch(r"[0-9a-f]{3}", "".join(p.relative_to(tiny_competition / folder).parts[:3]))
            for p in files
            if p.is_file()
        )


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
    train = {
        hashlib.sha256(p.read_bytes()).digest()
        for p in (tiny_competition / "landmark-recognition/train").rglob("*.jpg")
    }
    others = [
        p
        for split in ("landmark-recognition/test", "landmark-retrieval/index", "landmark-retrieval/test", "nonlandmark")
        for p in (tiny_competition / split).rglob("*.jpg")
    ]
    assert not any(hashlib.sha256(p.read_bytes()).digest() in train for p in others)


def test_distractor_set_shows_no_competition_landmark_and_no_test_image(tiny_competition):
    folder = nonlandmark_folder(tiny_competition)
    assert folder.parent == tiny_competition and folder not in (
        task_folder(tiny_competition, "recognition"),
        task_folder(tiny_competition, "retrieval"),
    )
    rows = plan_competition(SIZES["tiny"], seed=0, nonlandmark_share=0.7)
    distractors = plan_nonlandmark(SIZES["tiny"], 0, rows)
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{r.image_id}.jpg" for r in distractors)
    assert len(distractors) == SIZES["tiny"].nonlandmark
    families = {r.landmark.family_seed for r in rows if r.landmark is not None}
    views = [r.landmark for r in distractors if r.landmark is not None]
    assert len(views) == len(distractors) // 2 and len({lm.family_seed for lm in views}) > 1
    assert not any(lm.in_train or lm.family_seed in families for lm in views)  # never trained, never tested
    assert not {r.image_id for r in distractors} & {r.image_id for r in rows}
    test_bytes = {
        hashlib.sha256(p.read_bytes()).digest()
        for split in ("landmark-recognition/test", "landmark-retrieval/test")
        for p in (tiny_competition / split).rglob("*.jpg")
    }
    assert not any(hashlib.sha256(p.read_bytes()).digest() in test_bytes for p in folder.iterdir())


def test_same_seed_same_bytes_in_parallel_and_other_seed_differs(tiny_competition, tmp_path):
    again = build_synthetic(tmp_path / "again", size="tiny", seed=0, workers=2)
    assert tree_digest(again) == tree_digest(tiny_competition)
    other = build_synthetic(tmp_path / "other", size="tiny", seed=1)
    train_csv = "landmark-recognition/train.csv"
    assert (other / train_csv).read_text() != (tiny_competition / train_csv).read_text()
    build_synthetic(other, size="tiny", seed=0, overwrite=True)  # another build of the kit: replaced whole
    assert tree_digest(other) == tree_digest(tiny_competition)


def test_existing_output_same_build_is_kept_other_build_is_an_error(tiny_competition, tmp_path):
    before = tree_digest(tiny_competition)
    assert build_synthetic(tiny_competition, size="tiny", seed=0) == tiny_competition
    assert tree_digest(tiny_competition) == before
    with pytest.raises(UserError, match="different competition"):
        build_synthetic(tiny_competition, size="tiny", seed=3)
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("not the kit's")
    with pytest.raises(UserError, match="already exists"):
        build_synthetic(stranger, size="tiny")
    with pytest.raises(UserError, match="--size 'huge': unknown"):
        build_synthetic(tmp_path / "x", size="huge")
    with pytest.raises(UserError, match="not written by this kit"):
        build_synthetic(stranger, size="tiny", overwrite=True)
    assert [p.name for p in stranger.iterdir()] == ["notes.txt"]


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
    folder = nonlandmark_folder(tiny_competition)
    assert f"distractors: {SIZES['tiny'].nonlandmark} images of no landmark in {folder}" in out
    assert run_main(build_main, ["synthetic", "--seed", "5", "--out", str(tiny_competition)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--seed", "-5"], "--seed"),
        (["--nonlandmark-share", "1.5"], "--nonlandmark-share"),
        (["--nonlandmark-share", "nan"], "--nonlandmark-share"),
        (["--out", "{file}/sub"], "is a file, not a folder"),
        (["--out", "{file}"], "exists and is not a folder"),
        (["--out", "/proc/kit-test-out"], "cannot write in /proc"),
        (["--out", "{mine}", "--overwrite"], "not written by this kit"),
    ],
)
def test_bad_flags_are_one_error_line_and_touch_nothing(tmp_path, capsys, flags, named):
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    flags = [f.format(file=tmp_path / "file", mine=tmp_path / "mine") for f in flags]
    argv = ["synthetic", "--out", str(tmp_path / "o"), *flags]  # a later --out wins
    assert run_main(build_main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "x"

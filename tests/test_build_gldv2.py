"""The GLDv2 subset builder, on a small fake GLDv2 download written in the real formats."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cli import UserError, run_main
from common.gldv2 import image_path
from local_eval.build import main as build_main
from local_eval.gldv2_subset import build_gldv2_subset
from local_eval.layout import nonlandmark_folder


def new_id(rng: np.random.Generator) -> str:
    return hashlib.md5(rng.bytes(8)).hexdigest()[:16]


def write_image(root: Path, split: str, image_id: str) -> None:
    path = image_path(root, split, image_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (int(image_id[:2], 16), 0, 0)).save(path, format="JPEG")


@pytest.fixture(scope="module")
def fake_gldv2(tmp_path_factory) -> Path:
    """16 landmarks (12 clean), 60 test images (12 of clean landmarks, 3 of unclean ones), 50 index images."""
    root = tmp_path_factory.mktemp("gldv2")
    rng = np.random.default_rng(0)
    train_rows, clean_rows = [], []
    for landmark in range(100, 116):
        ids = [new_id(rng) for _ in range(rng.integers(3, 7))]
        train_rows += [(i, f"http://example.org/{i}.jpg", landmark) for i in ids]
        if landmark < 112:
            clean_rows.append((landmark, " ".join(ids[:-1])))
    test_landmarks = [str(100 + i % 12) for i in range(12)] + ["113", "114", "115"] + [""] * 45
    test_ids = [new_id(rng) for _ in test_landmarks]
    usage = ["Ignored" if i % 10 == 9 else "Public" if i % 3 == 0 else "Private" for i in range(len(test_ids))]
    index_ids = [new_id(rng) for _ in range(50)]
    retrieval = [
        (
            t,
            " ".join(index_ids[3 * k : 3 * k + 1 + k % 3]) if k < 10 else "None",
            "Ignored" if k >= 10 else usage[k] if usage[k] != "Ignored" else "Public",
        )
        for k, t in enumerate(test_ids)
    ]
    pd.DataFrame(train_rows, columns=["id", "url", "landmark_id"]).to_csv(root / "train.csv", index=False)
    pd.DataFrame(clean_rows, columns=["landmark_id", "images"]).to_csv(root / "train_clean.csv", index=False)
    pd.DataFrame({"id": test_ids, "landmarks": test_landmarks, "Usage": usage}).to_csv(
        root / "recognition_solution_v2.1.csv", index=False
    )
    pd.DataFrame(retrieval, columns=["id", "images", "Usage"]).to_csv(root / "retrieval_solution_v2.1.csv", index=False)
    for split, ids in (("train", [r[0] for r in train_rows]), ("test", test_ids), ("index", index_ids)):
        for image_id in ids:
            write_image(root, split, image_id)
    return root


def read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def subset(fake_gldv2, tmp_path_factory) -> Path:
    return build_gldv2_subset(fake_gldv2, tmp_path_factory.mktemp("subset") / "out", n_test=20, n_index=30, seed=0)


def test_layout_headers_and_links(subset, fake_gldv2):
    for name, header in (
        ("landmark-recognition/train.csv", "id,landmark_id"),
        ("landmark-recognition/sample_submission.csv", "id,landmarks"),
        ("landmark-retrieval/sample_submission.csv", "id,images"),
        ("solutions/recognition_solution.csv", "id,landmarks,Usage"),
        ("solutions/retrieval_solution.csv", "id,images,Usage"),
    ):
        assert (subset / name).read_text().splitlines()[0] == header, name
    images = list(subset.rglob("*.jpg"))
    assert images and all(p.is_symlink() and p.resolve().is_relative_to(fake_gldv2.resolve()) for p in images)
    assert all(p.resolve().name == p.name for p in images)


def test_recognition_subset_is_consistent(subset, fake_gldv2):
    train = read(subset / "landmark-recognition/train.csv")
    solution = read(subset / "solutions/recognition_solution.csv")
    official = read(fake_gldv2 / "recognition_solution_v2.1.csv").set_index("id")
    clean = {i for images in read(fake_gldv2 / "train_clean.csv").images for i in images.split()}
    assert len(solution) == 20 and set(train.id) <= clean
    assert (solution.set_index("id") == official.loc[solution.id]).all().all()
    test_landmarks = set(solution.landmarks[solution.landmarks != ""])
    assert test_landmarks and test_landmarks <= set(train.landmark_id)
    assert train.landmark_id.nunique() == 2 * len(test_landmarks)
    assert (solution.landmarks == "").mean() == pytest.approx((official.landmarks == "").mean(), abs=0.05)
    for split, ids in (("train", train.id), ("test", solution.id)):
        assert all(image_path(subset / "landmark-recognition", split, i).is_file() for i in ids)


def test_retrieval_subset_holds_every_relevant_image(subset, fake_gldv2):
    solution = read(subset / "solutions/retrieval_solution.csv")
    official = read(fake_gldv2 / "retrieval_solution_v2.1.csv").set_index("id")
    index = {p.stem for p in (subset / "landmark-retrieval/index").rglob("*.jpg")}
    assert len(index) == 30
    scored = solution[solution.Usage != "Ignored"]
    assert len(scored) > 0 and set(solution.images[solution.Usage == "Ignored"]) <= {"None"}
    for query, images in zip(scored.id, scored.images, strict=True):
        assert images == official.images[query] and set(images.split()) <= index
    assert all(image_path(subset / "landmark-retrieval", "test", i).is_file() for i in solution.id)


def test_same_seed_same_subset(subset, fake_gldv2, tmp_path):
    again = build_gldv2_subset(fake_gldv2, tmp_path / "again", n_test=20, n_index=30, seed=0)
    for name in (
        "landmark-recognition/train.csv",
        "solutions/recognition_solution.csv",
        "solutions/retrieval_solution.csv",
    ):
        assert (again / name).read_text() == (subset / name).read_text()


def test_missing_file_or_column_is_a_one_line_error(fake_gldv2, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("train.csv", "recognition_solution_v2.1.csv", "retrieval_solution_v2.1.csv"):
        (broken / name).write_text((fake_gldv2 / name).read_text())
    args = ["gldv2", "--gldv2", str(broken), "--out", str(tmp_path / "out"), "--test", "5", "--index", "10"]
    assert run_main(build_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "train_clean.csv" in err and err.count("\n") == 1
    (broken / "train_clean.csv").write_text("landmark_id,ids\n1,abc\n")
    with pytest.raises(UserError, match="missing column.*images"):
        build_gldv2_subset(broken, tmp_path / "out", n_test=5, n_index=10)
    assert not (tmp_path / "out").exists()


def test_nonlandmark_dir_becomes_the_distractor_set(fake_gldv2, tmp_path, capsys):
    source = tmp_path / "no-landmarks"
    rng = np.random.default_rng(7)
    images = [Path(f"{new_id(rng)}.jpg"), Path("2019/a/photo.JPEG"), Path("b/c.png")]
    for relative in images:
        (source / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(source / relative, format="PNG")
    (source / "README.txt").write_text("not an image")
    test_id = read(fake_gldv2 / "recognition_solution_v2.1.csv").id.iloc[0]
    write_image(source, "old-test", test_id)  # may be in the subset's test: left out if so
    out = tmp_path / "out"
    args = [
        "gldv2",
        "--gldv2",
        str(fake_gldv2),
        "--out",
        str(out),
        "--test",
        "60",
        "--index",
        "30",
        "--nonlandmark-dir",
        str(source),
    ]
    assert run_main(build_main, args) == 0
    folder = nonlandmark_folder(out)
    linked = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    subset_ids = {i for task in ("recognition", "retrieval") for i in read(out / f"solutions/{task}_solution.csv").id}
    assert test_id in subset_ids
    assert linked == sorted(images)  # every image but the subset's own test image and the text file
    assert all((folder / p).is_symlink() and (folder / p).resolve() == (source / p).resolve() for p in linked)
    assert f"distractors: 3 images of no landmark in {folder}" in capsys.readouterr().out
    assert run_main(build_main, args) == 0  # the same build: kept
    assert run_main(build_main, args[:-2]) == 2  # without the folder it is another build
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, named",
    [
        (["--test", "0"], "--test must be at least 1"),
        (["--index", "1"], "--index must be at least 2"),
        (["--seed", "-1"], "--seed must be at least 0"),
        (["--gldv2", "{file}"], "--gldv2 {file}: not a folder"),
        (["--nonlandmark-dir", "{missing}"], "--nonlandmark-dir {missing}: no such folder"),
        (["--nonlandmark-dir", "{empty}"], "--nonlandmark-dir {empty}: no image"),
        (["--out", "{file}/sub"], "{file} is a file, not a folder"),
    ],
)
def test_bad_flags_are_one_error_line(fake_gldv2, tmp_path, capsys, change, named):
    paths = {"file": tmp_path / "file", "missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    paths["file"].write_text("x")
    paths["empty"].mkdir()
    args = [
        "gldv2",
        "--gldv2",
        str(fake_gldv2),
        "--out",
        str(tmp_path / "out"),
        "--test",
        "5",
        "--index",
        "10",
        *(c.format(**paths) for c in change),
    ]
    assert run_main(build_main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named.format(**paths) in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "name, line, bad",
    [
        ("train.csv", 3, "landmark_id 'x7' is not a landmark id"),
        ("train_clean.csv", 2, "images 'abc' is not space-separated ids"),
        ("recognition_solution_v2.1.csv", 4, "Usage 'Secret' is not Public, Private or Ignored"),
        ("retrieval_solution_v2.1.csv", 2, "id 'short' is not an id of 16 hex digits"),
    ],
)
def test_a_malformed_field_names_file_line_and_id(fake_gldv2, tmp_path, name, line, bad):
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in ("train.csv", "train_clean.csv", "recognition_solution_v2.1.csv", "retrieval_solution_v2.1.csv"):
        (broken / file).write_text((fake_gldv2 / file).read_text())
    frame = read(broken / name)
    column, value = bad.split(" ")[0], bad.split("'")[1]
    frame.loc[line - 2, column] = value
    frame.to_csv(broken / name, index=False)
    with pytest.raises(UserError, match=f"{broken / name}, line {line}: .*{column} '{value}' is not"):
        build_gldv2_subset(broken, tmp_path / "out", n_test=5, n_index=10)

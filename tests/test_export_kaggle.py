"""The Kaggle retrieval zip and the Kaggle bundle folder."""
from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import tensorflow as tf

from export.__main__ import main as export_main
from tests.test_export_delg import LANDMARK_IDS, make_run_dir, random_image
from train.config import RETRIEVAL_SCALES


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export_kaggle")
    return root / "run", make_run_dir(root / "run")


def test_retrieval_zip_holds_the_saved_model_at_its_root(run, tmp_path, capsys):
    run_dir, model = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "model.zip")]) == 0
    assert "MB (limit 500 MB)" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "unzipped")
    assert "saved_model.pb" in names and any(name.startswith("variables/") for name in names)

    serve = tf.saved_model.load(str(tmp_path / "unzipped")).signatures["serving_default"]
    image = random_image(72, 96)
    got = serve(input_image=tf.constant(image))["global_descriptor"].numpy()
    per_scale = [model(tf.image.resize(image[None].astype(np.float32), (round(72 * s), round(96 * s))))["embedding"]
                 for s in RETRIEVAL_SCALES]
    expected = tf.nn.l2_normalize(tf.add_n(per_scale)[0], axis=0).numpy()
    assert got.shape == (64,)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_retrieval_dim_other_than_trained_is_refused(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--dim", "512"]) == 2
    assert "embedding_dim 64" in capsys.readouterr().err
    assert not (tmp_path / "m.zip").exists()


def test_retrieval_zip_over_the_size_limit_is_not_written(run, tmp_path, capsys):
    run_dir, _ = run
    assert export_main(["retrieval", "--run", str(run_dir), "--out", str(tmp_path / "m.zip"), "--max-mb", "0.01"]) == 2
    assert "over the --max-mb limit" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bundle_has_model_script_wheel_and_metadata(run, tmp_path):
    run_dir, _ = run
    script = tmp_path / "main.py"
    script.write_text("print('submission')\n")
    wheel = tmp_path / "pydegensac-0.3.0-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"wheel")
    out = tmp_path / "bundle"
    argv = ["bundle", "--run", str(run_dir), "--out", str(out), "--kaggle-user", "alice", "--dataset", "my-delg",
            "--kernel", "my-submission", "--competition", "landmark-retrieval-2021", "--wheel", str(wheel),
            "--script", str(script), "--time-budget-h", "12"]
    assert export_main(argv) == 0
    assert (out / "delg" / "saved_model.pb").is_file()
    assert (out / "delg" / "assets" / "label_map.csv").read_text().splitlines()[1:] == [
        f"{i},{landmark}" for i, landmark in enumerate(LANDMARK_IDS)]
    assert (out / "submission" / "main.py").read_text() == script.read_text()
    assert (out / "wheels" / wheel.name).read_bytes() == b"wheel"
    dataset = json.loads((out / "dataset-metadata.json").read_text())
    kernel = json.loads((out / "kernel-metadata.json").read_text())
    assert dataset["id"] == "alice/my-delg"
    assert kernel["id"] == "alice/my-submission"
    assert (kernel["enable_gpu"], kernel["enable_internet"]) == (True, False)
    assert kernel["dataset_sources"] == ["alice/my-delg"]
    assert kernel["competition_sources"] == ["landmark-retrieval-2021"]
    launcher = (out / kernel["code_file"]).read_text()
    compile(launcher, kernel["code_file"], "exec")
    assert 'DATASET = "/kaggle/input/my-delg"' in launcher and 'DATASET + "/submission/main.py"' in launcher
    assert '"--task", "retrieval"' in launcher
    assert "/kaggle/input/landmark-retrieval-2021" in launcher and "--no-index" in launcher
    assert '"--time-budget-h", "12.0"' in launcher


def test_bundle_without_submission_script_is_a_one_line_error(run, tmp_path, capsys):
    run_dir, _ = run
    argv = ["bundle", "--run", str(run_dir), "--out", str(tmp_path / "b"), "--kaggle-user", "alice",
            "--script", str(tmp_path / "missing.py")]
    assert export_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "missing.py" in err and "\n" not in err
    assert not (tmp_path / "b").exists()

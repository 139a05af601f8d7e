"""PCA whitening: the numpy fit, and the exports that bake it into every global output."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from common.cli import run_main
from export.__main__ import main as export_main
from export.__main__ import main_bundle, main_delg, main_retrieval
from export.delg import (
    DELG_GLOBAL_SCALES,
    EXPORT_INFO_FILE,
    GLOBAL_BATCH,
    GLOBAL_BATCH_FLOAT16,
    XLA_SUFFIX,
    load_trained_model,
)
from export.whitening import PcaWhitening, fit_pca_whitening, l2_normalize, mean_pair_cosine, whiten
from tests.conftest import WHITEN_IMAGES
from tests.test_export_delg import TINY_DIM, batched_descriptors, extract, landmark_images, make_run_dir
from tests.test_export_kaggle import write_wheel
from train.config import RETRIEVAL_SCALES
from train.run_files import DATA_FILE

FIT_IMAGES = str(WHITEN_IMAGES)  # training images the exports below fit on (as conftest's whitened export)


def correlated(count: int, width: int, seed: int = 0) -> np.ndarray:
    """count descriptors of width dims with a strongly unequal, correlated covariance and a shared offset."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(width, width)) * np.geomspace(10, 0.1, width)[:, None]
    return rng.normal(size=(count, width)) @ mixing + rng.normal(size=width) * 5


# --- The fit ---


def test_fit_whitens_the_kept_axes():
    x = correlated(20_000, 16)
    fit = fit_pca_whitening(x, shrinkage=1e-10)
    projected = (x - fit.mean) @ fit.projection
    np.testing.assert_allclose(np.cov(projected, rowvar=False), np.eye(16), atol=1e-3)
    assert np.abs(np.cov(x, rowvar=False) - np.eye(16)).max() > 10, "the input was far from white"
    assert (np.diff(fit.eigenvalues) <= 0).all(), "axes come largest variance first"


def test_shrinkage_damps_the_small_axes():
    x = correlated(5_000, 8)
    variances = np.var((x - x.mean(0)) @ fit_pca_whitening(x, shrinkage=1.0).projection, axis=0, ddof=1)
    assert variances[0] > 0.8 and variances[-1] < 0.01, "the axis of least variance stays small with shrinkage 1"
    assert (np.diff(variances) <= 1e-9).all()


def test_reduced_dim_keeps_the_axes_of_largest_variance():
    x = correlated(5_000, 12)
    full, reduced = fit_pca_whitening(x, 1e-6), fit_pca_whitening(x, 1e-6, dim=4)
    assert reduced.projection.shape == (12, 4) and reduced.dim == 4
    np.testing.assert_allclose(reduced.projection, full.projection[:, :4], rtol=1e-5, atol=1e-7)
    assert whiten(x[:5], reduced).shape == (5, 4)
    np.testing.assert_allclose(np.linalg.norm(whiten(x[:5], reduced), axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="dim 13"):
        fit_pca_whitening(x, 0.1, dim=13)


def test_fewer_descriptors_than_dims_stay_finite():
    x = l2_normalize(correlated(5, 32))  # rank 4 after centring: 28 axes with eigenvalue ~0
    fit = fit_pca_whitening(x, shrinkage=0.1)
    assert (fit.eigenvalues[4:] < 1e-12).all() and np.isfinite(fit.projection).all()
    # A null axis is scaled by 1/sqrt(floor) at most: no larger than sqrt(1/0.1 + 1) times an average axis.
    assert np.abs(fit.projection).max() <= np.sqrt(1 / fit.floor) + 1e-3
    out = whiten(l2_normalize(correlated(7, 32, seed=1)), fit)
    assert np.isfinite(out).all()
    with pytest.raises(ValueError, match="shrinkage 0"):
        fit_pca_whitening(x, shrinkage=0.0)
    with pytest.raises(ValueError, match="all equal"):
        fit_pca_whitening(np.ones((3, 4)), shrinkage=0.1)


def test_tf_whitening_equals_numpy():
    x = l2_normalize(correlated(300, 16)).astype(np.float32)
    fit = fit_pca_whitening(x, 0.1, dim=10)
    np.testing.assert_allclose(PcaWhitening(fit)(tf.constant(x[:7])).numpy(), whiten(x[:7], fit), atol=1e-5)


def test_whitening_spreads_collapsed_descriptors():
    x = l2_normalize(correlated(2_000, 16) + 200)  # all near one direction, like a weak model's
    assert mean_pair_cosine(x) > 0.95
    assert abs(mean_pair_cosine(whiten(x, fit_pca_whitening(x, 0.1)))) < 0.05


# --- The exports ---


@pytest.fixture(scope="module")
def delg_pair(tiny_model, tiny_float16_model):
    """The tiny run exported twice (conftest's): whitened (with the float16 functions) and not; both loaded."""
    return {
        name: (out, tf.saved_model.load(str(out)))
        for name, out in (("plain", tiny_model), ("white", tiny_float16_model))
    }


def fitted(loaded) -> tuple[np.ndarray, np.ndarray]:
    return loaded.pca_whitening.mean.numpy(), loaded.pca_whitening.projection.numpy()


def numpy_whiten(rows: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    return l2_normalize((rows - mean) @ projection)


def export_info(saved_model_dir: Path) -> dict:
    return json.loads((saved_model_dir / "assets" / EXPORT_INFO_FILE).read_text())


def test_serving_default_rows_are_the_whitened_rows(delg_pair, tiny_competition):
    images = landmark_images(tiny_competition, 3, 72, 88)
    mean, projection = fitted(delg_pair["white"][1])
    for image in images:
        rows = {
            name: extract(
                loaded.signatures["serving_default"], image, scales=DELG_GLOBAL_SCALES, global_indices=(2, 0, 1)
            )["global_descriptors"]
            for name, (_, loaded) in delg_pair.items()
        }
        np.testing.assert_allclose(rows["white"], numpy_whiten(rows["plain"], mean, projection), atol=1e-4)
        assert np.abs(rows["white"] - rows["plain"]).max() > 0.1, "whitening changed the descriptors"


@pytest.mark.parametrize("function", [GLOBAL_BATCH, GLOBAL_BATCH + XLA_SUFFIX, GLOBAL_BATCH_FLOAT16])
def test_batched_functions_return_whitened_descriptors(delg_pair, tiny_competition, function):
    images = landmark_images(tiny_competition, 4, 64, 80)
    mean, projection = fitted(delg_pair["white"][1])
    plain_rows = np.stack(
        [
            extract(
                delg_pair["plain"][1].signatures["serving_default"],
                image,
                scales=DELG_GLOBAL_SCALES,
                global_indices=(0, 1, 2),
            )["global_descriptors"]
            for image in images
        ]
    )
    expected = l2_normalize(numpy_whiten(plain_rows, mean, projection).sum(axis=1))
    got = batched_descriptors(delg_pair["white"][1].signatures[function], images, list(DELG_GLOBAL_SCALES))
    np.testing.assert_allclose(got, expected, atol=1e-4 if function != GLOBAL_BATCH_FLOAT16 else 2e-2)


def test_no_whiten_gives_the_trained_descriptors(delg_pair, tiny_run, tiny_competition):
    """An unwhitened export (export_delg's default, as --no-whiten) is the training model's embedding, in every
    function."""
    model = load_trained_model(tiny_run)
    images = landmark_images(tiny_competition, 2, 64, 80)
    plain = delg_pair["plain"][1]
    expected = model(tf.constant(images, tf.float32))["embedding"].numpy()
    np.testing.assert_allclose(batched_descriptors(plain.signatures[GLOBAL_BATCH], images, [1.0]), expected, atol=1e-5)
    rows = extract(plain.signatures["serving_default"], images[0], scales=(1.0,))["global_descriptors"]
    np.testing.assert_allclose(rows[0], expected[0], atol=1e-5)
    assert not hasattr(plain, "pca_whitening")
    assert export_info(delg_pair["plain"][0])["whitening"] == {"applied": False}


def test_export_info_records_the_fit(delg_pair, tiny_run):
    info = export_info(delg_pair["white"][0])
    whitening = info["whitening"]
    assert whitening["applied"] and whitening["images"] == whitening["images_sampled"] == int(FIT_IMAGES)
    assert whitening["descriptors"] == 3 * int(FIT_IMAGES) and whitening["scales"] == list(DELG_GLOBAL_SCALES)
    assert (whitening["input_dim"], whitening["dim"], info["global_dim"]) == (TINY_DIM, TINY_DIM, TINY_DIM)
    assert whitening["shrinkage"] == 0.1 and 0 <= whitening["null_axes"] < TINY_DIM
    assert whitening["data"] == json.loads((tiny_run / DATA_FILE).read_text())["data"]
    assert whitening["mean_pair_cosine_after"] < whitening["mean_pair_cosine_before"]


def test_reduced_dim_shapes_every_output(tiny_run, tmp_path):
    out = tmp_path / "delg"
    assert (
        export_main(
            [
                "delg",
                "--run",
                str(tiny_run),
                "--out",
                str(out),
                "--no-xla",
                "--whiten-images",
                "12",
                "--whiten-dim",
                "20",
            ]
        )
        == 0
    )
    loaded = tf.saved_model.load(str(out))
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    rows = extract(loaded.signatures["serving_default"], image, scales=(1.0, 0.5), global_indices=(0, 1))
    assert rows["global_descriptors"].shape == (2, 20)
    assert batched_descriptors(loaded.signatures[GLOBAL_BATCH], image[None], [1.0]).shape == (1, 20)
    assert loaded.signatures[GLOBAL_BATCH].structured_outputs["global_descriptors"].shape.as_list() == [None, 20]
    assert export_info(out)["global_dim"] == 20 and export_info(out)["whitening"]["dim"] == 20


def test_retrieval_model_is_whitened_and_dim_reduces_it(tiny_run, delg_pair, tmp_path):
    zip_path = tmp_path / "model.zip"
    assert (
        export_main(
            ["retrieval", "--run", str(tiny_run), "--out", str(zip_path), "--whiten-images", FIT_IMAGES, "--dim", "32"]
        )
        == 0
    )
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(tmp_path / "unzipped")
    loaded = tf.saved_model.load(str(tmp_path / "unzipped"))
    mean, projection = fitted(loaded)
    assert projection.shape == (TINY_DIM, 32)
    image = np.random.default_rng(5).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    got = loaded.signatures["serving_default"](input_image=tf.constant(image))["global_descriptor"].numpy()
    rows = extract(
        delg_pair["plain"][1].signatures["serving_default"], image, scales=RETRIEVAL_SCALES, global_indices=(0, 1, 2)
    )["global_descriptors"]
    np.testing.assert_allclose(got, l2_normalize(numpy_whiten(rows, mean, projection).sum(axis=0)), atol=1e-4)
    # The fit is the DELG export's at the same scales and sample, cut to the 32 axes of largest variance.
    np.testing.assert_allclose(projection, fitted(delg_pair["white"][1])[1][:, :32], atol=1e-4)


@pytest.mark.parametrize(
    "main, extra, named",
    [
        (main_delg, ["--whiten-shrinkage", "0"], "--whiten-shrinkage must be a finite number above 0"),
        (main_delg, ["--whiten-images", "0"], "--whiten-images must be at least 1"),
        (
            main_delg,
            ["--whiten-dim", str(TINY_DIM + 1)],
            f"--whiten-dim {TINY_DIM + 1}: more than the run's embedding_dim {TINY_DIM}",
        ),
        (main_delg, ["--no-whiten", "--whiten-dim", "8"], "--whiten-dim has no effect with --no-whiten"),
        (main_delg, ["--whiten-data", "{tmp}/none"], "--whiten-data {tmp}/none: no such folder"),
        (main_delg, ["--whiten-data", "{tmp}/run"], "--whiten-data {tmp}/run: no train.csv in it"),
        (main_delg, [], "does not record its training data (data.json); pass --whiten-data DIR"),
        (main_retrieval, ["--dim", "8", "--no-whiten"], "keep the PCA whitening (no --no-whiten)"),
        (main_retrieval, ["--dim", "8", "--whiten-dim", "16"], "--dim 8 and --whiten-dim 16 disagree"),
        (main_bundle, ["--kaggle-user", "me", "--whiten-shrinkage", "nan"], "--whiten-shrinkage must be a finite"),
    ],
)
def test_bad_whitening_input_is_one_error_line(tmp_path, capsys, main, extra, named):
    make_run_dir(tmp_path / "run")  # an untrained run that records no training data
    out = tmp_path / ("m.zip" if main is main_retrieval else "m")
    argv = ["--run", str(tmp_path / "run"), "--out", str(out), *[flag.format(tmp=tmp_path) for flag in extra]]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named.format(tmp=tmp_path) in err, err
    assert not out.exists()


def test_missing_training_folder_is_one_error_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for path in tiny_run.rglob("*"):
        target = run / path.relative_to(tiny_run)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            target.write_bytes(path.read_bytes())
    (run / DATA_FILE).write_text(json.dumps({"data": str(tmp_path / "moved")}))
    assert run_main(main_delg, ["--run", str(run), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert f"training data {tmp_path / 'moved' / 'train.csv'} is missing; pass --whiten-data DIR" in err


def test_bundle_ships_the_whitened_model(tiny_run, tmp_path):
    out = tmp_path / "bundle"
    wheel = write_wheel(tmp_path, "cp312")  # given, so pip fetches none from the internet (test_export_kaggle tests it)
    assert (
        run_main(
            main_bundle,
            [
                "--run",
                str(tiny_run),
                "--out",
                str(out),
                "--kaggle-user",
                "me",
                "--wheel",
                str(wheel),
                "--whiten-images",
                "12",
                "--whiten-shrinkage",
                "0.5",
            ],
        )
        == 0
    )
    whitening = export_info(out / "delg")["whitening"]
    assert whitening["applied"] and whitening["images"] == 12 and whitening["shrinkage"] == 0.5

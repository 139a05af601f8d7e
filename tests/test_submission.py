"""Unit tests of submission/main.py: constants, model loading (TF2 and TF1), decoding, kNN, matching, scoring."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from local_eval.submission_script import load_submission
from tests.delg_test_models import write_tf1_model, write_tf2_model
from train import config

sub = load_submission()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("delg_models")
    return write_tf2_model(root / "tf2"), write_tf1_model(root / "tf1")


def delg(model_dir, **overrides):
    settings = dict(scales=[0.5, 1.0, 2.0], global_scale_indices=[0, 1], max_features=200,
                    attention_threshold=0.0) | overrides
    return sub.DelgModel(model_dir, **settings)


def textured_image(seed: int, size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = np.kron(rng.integers(0, 256, (size // 8, size // 8, 3)), np.ones((8, 8, 1)))
    return np.clip(blocks + rng.normal(0, 20, blocks.shape), 0, 255).astype(np.uint8)


def test_delg_constants_equal_train_config():
    assert sub.DELG_IMAGE_SCALES == config.DELG_IMAGE_SCALES
    assert sub.DELG_GLOBAL_SCALE_INDICES == config.DELG_GLOBAL_SCALE_INDICES
    assert sub.DELG_MAX_IMAGE_SIDE == config.DELG_MAX_IMAGE_SIDE
    assert sub.DELG_MAX_FEATURE_NUM == config.DELG_MAX_FEATURE_NUM
    assert sub.DELG_ATTENTION_ABS_THRESHOLD == config.DELG_ATTENTION_ABS_THRESHOLD


def test_help_explains_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        sub.main(["--help"])
    assert exit_info.value.code == 0
    parser = sub.build_parser()
    assert all(action.help for action in parser._actions)
    assert "--time-budget-h" in capsys.readouterr().out


def test_tf1_model_goes_through_prune_and_matches_tf2(models):
    tf2_dir, tf1_dir = models
    tf2_model, tf1_model = delg(tf2_dir), delg(tf1_dir)
    assert (tf2_model.kind, tf1_model.kind) == ("tf2", "tf1")
    image = textured_image(0)
    np.testing.assert_allclose(tf1_model.global_descriptor(image), tf2_model.global_descriptor(image), atol=1e-5)
    kp1, desc1 = tf1_model.local_features(image)
    kp2, desc2 = tf2_model.local_features(image)
    assert len(kp1) == 200
    np.testing.assert_allclose(kp1, kp2, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(desc1, axis=1), 1.0, atol=1e-5)


def test_global_descriptor_normalizes_each_scale_then_the_sum(models):
    model = delg(models[0])
    image = textured_image(1)
    raw = model(image, 1)["global_descriptors"]
    per_scale = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    expected = per_scale.sum(0) / np.linalg.norm(per_scale.sum(0))
    np.testing.assert_allclose(model.global_descriptor(image), expected, atol=1e-6)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(sub.InputError, match="saved_model.pb"):
        delg(tmp_path)


def encoded(array: np.ndarray, fmt: str, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("name, contents, shape", [
    ("gray.png", lambda a: encoded(a[..., 0], "PNG"), (96, 96, 3)),
    ("cmyk.jpg", lambda a: encoded(a, "JPEG", "CMYK"), (96, 96, 3)),
    ("rgba.png", lambda a: encoded(a, "PNG", "RGBA"), (96, 96, 3)),
    ("pixel.jpg", lambda a: encoded(a[:1, :1], "JPEG"), (32, 32, 3)),
    ("strip.png", lambda a: encoded(np.tile(a[:2], (1, 40, 1)), "PNG"), (32, 1024, 3)),
])
def test_decoding_odd_images(tmp_path, name, contents, shape):
    path = tmp_path / name
    path.write_bytes(contents(textured_image(2)))
    image = sub.decode_image(path, max_side=1024, min_side=32)
    assert image.dtype == np.uint8 and image.shape == shape


def test_decoding_caps_the_longer_side(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(encoded(np.tile(textured_image(3), (2, 3, 1)), "PNG"))
    assert sub.decode_image(path, max_side=100, min_side=32).shape == (67, 100, 3)


@pytest.mark.parametrize("contents", [None, b"", b"not an image", "truncated"])
def test_unreadable_images_decode_to_none(tmp_path, caplog, contents):
    path = tmp_path / "bad.jpg"
    if contents == "truncated":
        contents = encoded(textured_image(4), "JPEG")[:300]
    if contents is not None:
        path.write_bytes(contents)
    assert sub.decode_image(path, max_side=1024, min_side=32) is None
    assert "bad.jpg" in caplog.text


@pytest.mark.parametrize("search", [
    lambda q, d, k: sub.knn(q, d, k, block_mb=1),
    lambda q, d, k: sub.knn_numpy(q, d, k, q_block=16, db_chunk=300),  # several blocks of both
    lambda q, d, k: sub.knn_tensorflow(q, d, k, q_block=16, db_block=300),
])
def test_knn_blocks_equal_brute_force(search):
    rng = np.random.default_rng(0)
    queries, database = rng.normal(size=(70, 16)), rng.normal(size=(3000, 16))
    scores, indices = search(queries, database, 10)
    expected = np.argsort(-(queries @ database.T), axis=1)[:, :10]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ database.T, expected, 1), rtol=1e-4)


def test_mutual_matching_keeps_only_mutual_pairs_within_distance():
    a = np.array([[1, 0], [0.95, 0.3122], [0.6, 0.8]], np.float32)
    b = np.array([[1, 0], [0.6, 0.8]], np.float32)
    one_way = sub.putative_matches(a, b, max_distance=0.9, mutual=False)
    assert list(zip(*one_way, strict=True)) == [(0, 0), (1, 0), (2, 1)]
    assert list(zip(*sub.putative_matches(a, b, 0.9, mutual=True), strict=True)) == [(0, 0), (2, 1)]
    assert len(sub.putative_matches(a, b, 0.1, mutual=False)[0]) == 2  # a[1] is 0.32 from b[0]


SETTINGS = {"max_distance": 0.9, "mutual": True, "min_matches": 5, "threshold": 4.0, "confidence": 0.999,
            "iterations": 1000, "seed": 0}


def test_identical_view_has_more_inliers_than_an_unrelated_image(models):
    model = delg(models[0])
    scene = textured_image(5, 128)
    view = np.ascontiguousarray(scene[8:, 16:])  # the same scene, shifted
    inliers = lambda x, y: sub.count_inliers(*model.local_features(x), *model.local_features(y), SETTINGS)
    same, unrelated = inliers(scene, view), inliers(scene, textured_image(6, 128))
    assert same > 50 and same > 3 * unrelated


def test_too_few_matches_or_ransac_failure_score_zero():
    desc = np.eye(8, 16, dtype=np.float32)
    keypoints = np.zeros((8, 2), np.float32)  # degenerate: every point the same
    assert sub.count_inliers(keypoints, desc, keypoints, desc, SETTINGS) == 0
    assert sub.count_inliers(keypoints[:3], desc[:3], keypoints[:3], desc[:3], SETTINGS) == 0
    assert sub.count_inliers(keypoints, desc, np.zeros((0, 2)), np.zeros((0, 16)), SETTINGS) == 0


def test_retrieval_reorders_the_verified_prefix_by_inliers_then_cosine():
    cosines = np.array([[0.9, 0.8, 0.7, 0.6]])
    inliers = np.array([[3, 40, 40, -1]])
    rows = sub.retrieval_rows(cosines, np.array([[0, 1, 2, 3]]), inliers, ["a", "b", "c", "d"], np.array([True]))
    assert rows == ["b c a d"]


def test_recognition_sums_scores_per_landmark_and_penalizes_nonlandmarks():
    cosines = np.array([[0.9, 0.5, 0.45], [0.9, 0.5, 0.45]])
    neighbours = np.array([[0, 1, 2], [0, 1, 2]])
    labels = np.array([7, 8, 8])
    inliers = np.array([[20, 0, -1], [-1, -1, -1]])  # query 0: the first neighbour verified
    rows = sub.recognition_rows(cosines, neighbours, inliers, labels, top_k=3, max_inlier_score=20,
                                nonlandmark_share=np.array([0.0, 0.5]), penalty=1.0,
                                query_ok=np.array([True, True]))
    assert rows[0] == "7 1.900000"  # 0.9 + min(20, 20) / 20 beats 0.5 + 0.45
    assert rows[1] == "8 0.475000"  # 0.95 beats 0.9, halved by a non-landmark share of 0.5


def test_nonlandmark_share_counts_nonlandmarks_among_the_top_k():
    landmark_cos = np.array([[0.9, 0.8, 0.1]])
    nonlandmark_cos = np.array([[0.85, 0.2, 0.1]])
    assert sub.nonlandmark_shares(landmark_cos, nonlandmark_cos, top_k=3)[0] == pytest.approx(1 / 3)
    assert sub.nonlandmark_shares(landmark_cos, np.zeros((1, 0)), top_k=3)[0] == 0


def test_plan_depth_degrades_with_the_time_left(tmp_path):
    timing = sub.Timing(tmp_path / "timing.json", "recognition", budget_h=1.0, safety_margin=0.0)
    assert sub.plan_depth(timing, 100, max_depth=10, new_image_share=1.0) == 10  # nothing measured yet
    timing.add("local_features", 10, 1.0)  # 0.1 s per image
    timing.add("verification", 10, 1.0)  # 0.1 s per pair
    roomy = sub.plan_depth(timing, 100, 10, 1.0)
    tight = sub.plan_depth(timing, 10_000, 10, 1.0)
    assert roomy == 10 and 0 < tight < 10
    assert sub.plan_depth(timing, 1_000_000, 10, 1.0) == 0


def test_local_cache_is_trimmed_to_its_limit_oldest_first(tmp_path):
    import os

    for age, name in enumerate(["new", "mid", "old"]):
        path = sub.local_path(tmp_path, "train", name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (1e9 - age, 1e9 - age))
    assert sub.trim_local_cache(tmp_path, max_gb=2500 / 2**30) == 1
    assert sorted(p.stem for p in (tmp_path / "train").iterdir()) == ["mid", "new"]


@pytest.mark.parametrize("flag", ["--warmup-queries", "--rerank-batch", "--chunk-size"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_batch_sizes_must_be_positive(capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        sub.main(["--task", "recognition", "--data", "d", "--model", "m", flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: must be a positive integer" in capsys.readouterr().err


def test_compact_valid_moves_the_ok_rows_up_in_place():
    rng = np.random.default_rng(0)
    descriptors = rng.normal(size=(3 * sub.KNN_DB_CHUNK + 5, 4)).astype(np.float32)
    ok = rng.random(len(descriptors)) < 0.7
    expected = descriptors[ok]
    valid, rows = sub.compact_valid(descriptors, ok)
    np.testing.assert_array_equal(valid, expected)
    np.testing.assert_array_equal(rows, np.flatnonzero(ok))
    assert np.shares_memory(valid, descriptors)  # no second copy

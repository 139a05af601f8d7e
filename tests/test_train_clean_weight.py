"""--not-clean-weight W: images outside train_clean.csv count W in the loss (1: as if there were no clean list)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from tests.test_train_loop import checkpoint_values
from train.config import get_config
from train.loop import train


def folder(data_dir, out, clean_ids: list[str] | None):
    """data_dir's train.csv and images (linked), with a train_clean.csv listing clean_ids when given."""
    out.mkdir()
    (out / "train").symlink_to(data_dir / "train")
    table = pd.read_csv(data_dir / "train.csv", dtype=str)
    table.to_csv(out / "train.csv", index=False)
    if clean_ids is not None:
        clean = table[table["id"].isin(clean_ids)].groupby("landmark_id")["id"].agg(" ".join)
        clean.rename("images").reset_index().to_csv(out / "train_clean.csv", index=False)
    return out


def test_not_clean_images_count_their_weight_in_the_loss(data_dir, tmp_path):
    ids = pd.read_csv(data_dir / "train.csv", dtype=str)["id"]
    clean_ids = list(ids[::2])
    plain = folder(data_dir, tmp_path / "plain", None)
    listed = folder(data_dir, tmp_path / "listed", clean_ids)

    def run(data, name, weight):
        cfg = get_config(
            "tiny",
            steps=2,
            image_size=64,
            batch_size=16,
            warmup_steps=1,
            validation_fraction=0.0,
            not_clean_weight=weight,
            log_every=1,
            checkpoint_every=2,
        )
        metrics = train(cfg, data_dir=data, run_dir=tmp_path / name)
        return metrics, checkpoint_values(tmp_path / name)

    (_, without_list), (_, full_weight), (half, half_weight) = (
        run(plain, "plain", 0.0),
        run(listed, "full", 1.0),
        run(listed, "half", 0.5),
    )
    assert without_list.keys() == full_weight.keys() == half_weight.keys()
    for name, value in without_list.items():
        np.testing.assert_array_equal(value, full_weight[name], err_msg=name)
    assert any(not np.array_equal(value, half_weight[name]) for name, value in without_list.items())
    assert half["train_images"] == len(ids)

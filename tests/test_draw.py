"""The line chart of depth.png and tradeoff.png: a legend that fits, series told apart, nothing overlapping, the
chosen point ringed."""

from __future__ import annotations

import numpy as np

from local_eval.draw import BACKGROUND, LEGEND_ROW, SERIES_DASHES, line_chart, series_style

SERIES = {
    f"match_max_distance={0.9 + k / 10:.1f}, mutual={k % 2 == 0}, ransac_threshold={0.01 * (k + 1):.2f}, "
    f"ransac_iterations=1000, ransac_confidence=1.0, min_matches={4 + k}, a long tail of words to cut short": [
        (depth, 0.5 + 0.01 * depth + 0.001 * k) for depth in (0, 1, 3, 5, 10, 20)
    ]
    for k in range(5)
}


def ink_rows(picture, top: int, bottom: int, right: int = 400) -> np.ndarray:
    """Which rows of the left part of the picture hold anything but background."""
    pixels = np.asarray(picture)[top:bottom, :right]
    return (pixels != BACKGROUND).any(axis=(1, 2))


def test_five_series_differ_in_colour_marker_and_dash():
    styles = [series_style(k) for k in range(5)]
    for part in range(3):
        assert len({style[part] for style in styles}) == 5
    assert SERIES_DASHES[0] == ()  # the first series is solid


def test_the_whole_legend_fits_with_every_series_in_its_colour():
    picture = line_chart(SERIES, "title", "rerank depth", "Public GAP")
    pixels = np.asarray(picture)
    assert picture.height > 420 + 5 * LEGEND_ROW - 1  # the canvas grows with the legend
    assert not ink_rows(picture, picture.height - 4, picture.height, picture.width).any()  # nothing cut at the bottom
    legend = pixels[-(5 * LEGEND_ROW + 8) :]
    for k in range(5):
        row = legend[LEGEND_ROW * k : LEGEND_ROW * (k + 1)]
        assert (row == series_style(k)[0]).all(axis=-1).any(), f"legend row {k} lacks its colour"
    assert (pixels[-(5 * LEGEND_ROW) :, -19:] == BACKGROUND).all()  # long names cut short, inside the margin


def test_the_title_and_the_y_label_do_not_touch():
    picture = line_chart(SERIES, "recognition: Public GAP by rerank depth", "rerank depth", "Public GAP")
    rows = ink_rows(picture, 0, 58)  # above the plot: the title, then the y label
    runs = np.flatnonzero(np.diff(rows.astype(int)) == 1)
    assert len(runs) + rows[0] >= 2  # two separate bands of ink, blank rows between them


def test_the_marked_point_is_ringed_and_named():
    plain = line_chart(SERIES, "title", "x", "y")
    marked = line_chart(SERIES, "title", "x", "y", marked=(20, 0.5 + 0.2, "chosen: rerank 20"))
    assert marked.height == plain.height + LEGEND_ROW
    plot_rows = plain.height - 5 * LEGEND_ROW - 8 - 44  # the same plot area in both
    changed = (np.asarray(marked)[:plot_rows] != np.asarray(plain)[:plot_rows]).any(axis=-1)
    rows, columns = np.nonzero(changed)
    assert len(columns) and columns.min() > plain.width - 60  # only around the last point, at the right end

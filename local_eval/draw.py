"""Pictures for `local_eval show`, drawn with Pillow: match pictures, attention heat maps, the GAP curve.

Keypoints are [y, x] in the pixels of the image the model saw, as the DELG contract gives them.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from common.cli import atomic_write

PANEL_HEIGHT = 320  # both images of a match picture are scaled to this height
PANEL_GAP = 12
CAPTION_HEIGHT = 28
HEAT_OPACITY = 0.8
INLIER_COLOUR = (40, 230, 70, 255)
REJECTED_COLOUR = (255, 70, 70, 60)  # faint
BACKGROUND = (255, 255, 255)
# Anchors of a dark-blue -> red -> yellow colour map for the attention heat.
HEAT_ANCHORS = np.array([[0, 0, 80], [120, 0, 160], [230, 40, 40], [255, 160, 0], [255, 255, 120]], float)


def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def save_png(image: Image.Image, path: Path) -> None:
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def heat_colours(values: np.ndarray) -> np.ndarray:
    """uint8 RGB of values in [0, 1] on the heat colour map."""
    positions = np.linspace(0, 1, len(HEAT_ANCHORS))
    channels = [np.interp(values, positions, HEAT_ANCHORS[:, c]) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.uint8)


def attention_overlay(image: np.ndarray, keypoints: np.ndarray, scores: np.ndarray) -> Image.Image:
    """The image in grey with its local features' attention scores splatted at their keypoints as heat."""
    height, width = image.shape[:2]
    grey = np.repeat(np.asarray(Image.fromarray(image).convert("L"), float)[..., None], 3, axis=-1)
    if len(scores) == 0 or float(np.max(scores)) <= 0:
        return Image.fromarray(image)
    spacing = math.sqrt(height * width / len(scores))  # typical distance between two keypoints
    cell = max(1, int(spacing / 2))
    grid = np.zeros((height // cell + 1, width // cell + 1))
    rows = np.clip((keypoints[:, 0] // cell).astype(int), 0, grid.shape[0] - 1)
    cols = np.clip((keypoints[:, 1] // cell).astype(int), 0, grid.shape[1] - 1)
    np.maximum.at(grid, (rows, cols), np.maximum(scores, 0))
    heat = Image.fromarray((grid / grid.max() * 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    heat = np.asarray(heat.filter(ImageFilter.GaussianBlur(spacing / 3)), float)
    heat /= max(heat.max(), 1e-6)
    alpha = (heat * HEAT_OPACITY)[..., None]
    blended = grey * (1 - alpha) + heat_colours(heat) * alpha
    return Image.fromarray(blended.astype(np.uint8))


def _scaled(picture: Image.Image) -> tuple[Image.Image, float]:
    factor = PANEL_HEIGHT / picture.height
    return picture.resize((max(1, round(picture.width * factor)), PANEL_HEIGHT), Image.BILINEAR), factor


def match_picture(
    left: Image.Image,
    right: Image.Image,
    kp_left: np.ndarray,
    kp_right: np.ndarray,
    matches_left: np.ndarray,
    matches_right: np.ndarray,
    inliers: np.ndarray,
    caption: str,
) -> Image.Image:
    """Two images side by side: RANSAC inliers as bright lines, rejected putative matches faint."""
    left, factor_left = _scaled(left)
    right, factor_right = _scaled(right)
    offset = left.width + PANEL_GAP
    caption_width = round(ImageDraw.Draw(left).textlength(caption, font=font(16))) + 12
    canvas = Image.new("RGB", (max(offset + right.width, caption_width), CAPTION_HEIGHT + PANEL_HEIGHT), BACKGROUND)
    canvas.paste(left, (0, CAPTION_HEIGHT))
    canvas.paste(right, (offset, CAPTION_HEIGHT))
    lines = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(lines)
    ends_left = kp_left[matches_left][:, ::-1] * factor_left + (0, CAPTION_HEIGHT)
    ends_right = kp_right[matches_right][:, ::-1] * factor_right + (offset, CAPTION_HEIGHT)
    for is_inlier in (False, True):  # inliers last, on top
        colour, width = (INLIER_COLOUR, 2) if is_inlier else (REJECTED_COLOUR, 1)
        for (x0, y0), (x1, y1) in zip(ends_left[inliers == is_inlier], ends_right[inliers == is_inlier], strict=True):
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=width)
            if is_inlier:
                for x, y in ((x0, y0), (x1, y1)):
                    draw.ellipse([x - 3, y - 3, x + 3, y + 3], outline=colour, width=2)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), lines).convert("RGB")
    ImageDraw.Draw(canvas).text((6, 5), caption, fill=(0, 0, 0), font=font(16))
    return canvas


def precision_curve(correct: np.ndarray, title: str, size: tuple[int, int] = (640, 360)) -> Image.Image:
    """Precision at each rank of the confidence-sorted predictions; correct ones dotted green, wrong red.

    GAP is the sum of the precisions at the green dots divided by the number of landmark images."""
    width, height = size
    margin_left, margin_right, margin_top, margin_bottom = 52, 16, 34, 40
    canvas = Image.new("RGB", size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    small = font(12)
    draw.text((margin_left, 8), title, fill=(0, 0, 0), font=font(15))
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    to_x = lambda rank: margin_left + (rank - 1) / max(1, len(correct) - 1) * plot_w
    to_y = lambda precision: margin_top + (1 - precision) * plot_h
    draw.rectangle([margin_left, margin_top, margin_left + plot_w, margin_top + plot_h], outline=(0, 0, 0))
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = to_y(tick)
        draw.line([(margin_left - 4, y), (margin_left + plot_w, y)], fill=(225, 225, 225))
        draw.text((6, y - 7), f"{tick:.2f}", fill=(0, 0, 0), font=small)
    draw.text((margin_left + plot_w // 2 - 70, height - 18), "rank by confidence", fill=(0, 0, 0), font=small)
    draw.text((margin_left, margin_top + plot_h + 4), "1", fill=(0, 0, 0), font=small)
    draw.text((margin_left + plot_w - 24, margin_top + plot_h + 4), str(len(correct)), fill=(0, 0, 0), font=small)
    if len(correct) == 0:
        return canvas
    ranks = np.arange(1, len(correct) + 1)
    precision = np.cumsum(correct) / ranks
    draw.line([(to_x(r), to_y(p)) for r, p in zip(ranks, precision, strict=True)], fill=(60, 60, 200), width=2)
    for r, p, ok in zip(ranks, precision, correct, strict=True):
        x, y = to_x(r), to_y(p)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(30, 170, 50) if ok else (220, 50, 50))
    draw.text(
        (margin_left + plot_w - 170, margin_top + 6),
        f"{int(correct.sum())} correct of {len(correct)}",
        fill=(0, 0, 0),
        font=small,
    )
    return canvas


SERIES_COLOURS = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (148, 103, 189),
    (255, 127, 14),
    (23, 190, 207),
    (140, 86, 75),
    (127, 127, 127),
]
SERIES_MARKERS = ("circle", "square", "triangle", "diamond", "cross")
SERIES_DASHES = ((), (10, 5), (3, 4), (12, 4, 3, 4), (6, 3))  # on/off lengths in pixels; () is a solid line
LEGEND_ROW = 18
MARK_COLOUR = (0, 0, 0)


def series_style(index: int) -> tuple[tuple[int, int, int], str, tuple[int, ...]]:
    """(colour, marker, dash pattern) of the index-th series: neighbours differ in all three."""
    return (
        SERIES_COLOURS[index % len(SERIES_COLOURS)],
        SERIES_MARKERS[index % len(SERIES_MARKERS)],
        SERIES_DASHES[index % len(SERIES_DASHES)],
    )


def draw_marker(draw: ImageDraw.ImageDraw, kind: str, x: float, y: float, colour, radius: float = 4) -> None:
    r = radius
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif kind == "triangle":
        draw.polygon([(x, y - r - 1), (x - r - 1, y + r), (x + r + 1, y + r)], fill=colour)
    elif kind == "diamond":
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)
    else:  # cross
        draw.line([(x - r, y - r), (x + r, y + r)], fill=colour, width=3)
        draw.line([(x - r, y + r), (x + r, y - r)], fill=colour, width=3)


def draw_polyline(
    draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour, dash: tuple[int, ...], width: int = 2
) -> None:
    """A line through points, solid or in the on/off dash pattern (which runs on from one segment to the next)."""
    if not dash:
        draw.line(points, fill=colour, width=width)
        return
    walked = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        steps = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0)))  # one pixel each
        run: list[tuple[float, float]] = []
        for k in range(steps + 1):
            at = (x0 + (x1 - x0) * k / steps, y0 + (y1 - y0) * k / steps)
            if dash_is_on(walked + k * math.hypot(x1 - x0, y1 - y0) / steps, dash):
                run.append(at)
            elif run:
                draw.line([run[0], run[-1]], fill=colour, width=width)
                run = []
        if len(run) > 1:
            draw.line([run[0], run[-1]], fill=colour, width=width)
        walked += math.hypot(x1 - x0, y1 - y0)


def dash_is_on(distance: float, dash: tuple[int, ...]) -> bool:
    """Whether the point `distance` pixels along a line falls on an "on" part of the dash pattern."""
    at = distance % sum(dash)
    for index, part in enumerate(dash):
        if at < part:
            return index % 2 == 0
        at -= part
    return False


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: float, text_font) -> str:
    """text, cut with an ellipsis when it is wider than width."""
    if draw.textlength(text, font=text_font) <= width:
        return text
    while text and draw.textlength(text + "…", font=text_font) > width:
        text = text[:-1]
    return text + "…"


LINE_CHART_SIZE = (820, 420)  # width, and height above the legend


def line_chart(
    series: dict[str, list[tuple[float, float]]],
    title: str,
    x_label: str,
    y_label: str,
    vertical: tuple[float, str] | None = None,
    marked: tuple[float, float, str] | None = None,
    note: str | None = None,
    styles: list[tuple[tuple[int, int, int], str, tuple[int, ...]]] | None = None,
) -> Image.Image:
    """Lines with markers, one per named series of (x, y) points, each series in its own colour, marker and dash
    (or styles[i], the i-th series' (colour, marker, dash)); the legend under the plot (the canvas grows with it).
    Optionally a dashed vertical line at vertical[0] labelled vertical[1] (a time limit, say), a ring around the
    point marked[:2] labelled marked[2] (the chosen setting), and a note line under the title (what every series
    shares)."""
    width, plot_height = LINE_CHART_SIZE
    legend_h = LEGEND_ROW * (len(series) + (marked is not None)) + 8
    height = plot_height + legend_h
    title_font, small = font(15), font(12)
    margin_left, margin_right = 60, 20
    margin_top = 58 + (16 if note else 0)  # title, note, then the y label above the plot
    margin_bottom = 44 + legend_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (margin_left, 8), fit_text(draw, title, width - margin_left - 8, title_font), fill=(0, 0, 0), font=title_font
    )
    if note:
        draw.text(
            (margin_left, 30), fit_text(draw, note, width - margin_left - 8, small), fill=(70, 70, 70), font=small
        )
    points = [point for line in series.values() for point in line]
    xs = [x for x, _ in points] + ([vertical[0]] if vertical else [])
    ys = [y for _, y in points]
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    y_low, y_high = (min(ys), max(ys)) if ys else (0.0, 1.0)
    pad = max(1e-9, (y_high - y_low) * 0.08)
    y_low, y_high = y_low - pad, y_high + pad
    x_high = x_high if x_high > x_low else x_low + 1
    plot_w, plot_h = width - margin_left - margin_right, height - margin_top - margin_bottom
    inset = 10  # pixels between the frame and the first and last x, so that no marker sits on the frame
    to_x = lambda x: margin_left + inset + (x - x_low) / (x_high - x_low) * (plot_w - 2 * inset)
    to_y = lambda y: margin_top + (1 - (y - y_low) / (y_high - y_low)) * plot_h
    draw.rectangle([margin_left, margin_top, margin_left + plot_w, margin_top + plot_h], outline=(0, 0, 0))
    for i in range(5):
        y_value, x_value = y_low + (y_high - y_low) * i / 4, x_low + (x_high - x_low) * i / 4
        draw.line([(margin_left - 4, to_y(y_value)), (margin_left + plot_w, to_y(y_value))], fill=(225, 225, 225))
        draw.text((4, to_y(y_value) - 7), f"{y_value:.3f}", fill=(0, 0, 0), font=small)
        draw.text((to_x(x_value) - 12, margin_top + plot_h + 4), f"{x_value:.3g}", fill=(0, 0, 0), font=small)
    draw.text(
        (margin_left + plot_w // 2 - draw.textlength(x_label, font=small) / 2, margin_top + plot_h + 20),
        x_label,
        fill=(0, 0, 0),
        font=small,
    )
    draw.text((4, margin_top - 26), y_label, fill=(0, 0, 0), font=small)
    if vertical:
        x = to_x(vertical[0])
        for top in range(margin_top, margin_top + plot_h, 8):
            draw.line([(x, top), (x, min(top + 4, margin_top + plot_h))], fill=(200, 0, 0), width=2)
        draw.text((x + 4, margin_top + 4), vertical[1], fill=(200, 0, 0), font=small)
    legend_top = margin_top + plot_h + 40
    for index, (name, line) in enumerate(series.items()):
        colour, marker, dash = styles[index] if styles else series_style(index)
        ordered = sorted(line)
        if len(ordered) > 1:
            draw_polyline(draw, [(to_x(x), to_y(y)) for x, y in ordered], colour, dash)
        for x, y in ordered:
            draw_marker(draw, marker, to_x(x), to_y(y), colour)
        row_y = legend_top + LEGEND_ROW * index
        draw_polyline(draw, [(margin_left, row_y + 8), (margin_left + 36, row_y + 8)], colour, dash)
        draw_marker(draw, marker, margin_left + 18, row_y + 8, colour)
        draw.text((margin_left + 44, row_y + 1), fit_text(draw, name, plot_w - 44, small), fill=(0, 0, 0), font=small)
    if marked:
        x, y = to_x(marked[0]), to_y(marked[1])
        draw.ellipse([x - 9, y - 9, x + 9, y + 9], outline=MARK_COLOUR, width=2)
        row_y = legend_top + LEGEND_ROW * len(series)
        draw.ellipse([margin_left + 12, row_y + 2, margin_left + 24, row_y + 14], outline=MARK_COLOUR, width=2)
        draw.text(
            (margin_left + 44, row_y + 1), fit_text(draw, marked[2], plot_w - 44, small), fill=(0, 0, 0), font=small
        )
    return canvas


def thumbnail(image: np.ndarray | None, side: int = 160) -> Image.Image:
    """A copy at most side x side; a grey 'unreadable' tile when there is no image."""
    if image is None:
        tile = Image.new("RGB", (side, side), (200, 200, 200))
        ImageDraw.Draw(tile).text((10, side // 2 - 8), "unreadable", fill=(80, 0, 0), font=font(14))
        return tile
    picture = Image.fromarray(image)
    picture.thumbnail((side, side))
    return picture

"""What the report's PNGs show: read back with matplotlib's image reader and checked pixel by pixel.

Colours are matched exactly (opaque markers, lines and legend handles keep the
colour they were drawn with), so each test finds what a reader would see: the
kept run's line, one colour per component, one curve per covariance model, one
frame per panel.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread
from scipy import ndimage

import daskem
from daskem.report import (
    _place_labels,
    _plt,
    component_colors,
    plot_classification,
    plot_loglik,
    plot_projection,
    plot_select_k,
    write_report,
)


def _pixels(path) -> np.ndarray:
    return imread(str(path))[..., :3].astype(np.float64)


def _mask(img: np.ndarray, color, tol: float = 0.02) -> np.ndarray:
    """Pixels of exactly ``color`` (within ``tol`` per channel)."""
    return np.all(np.abs(img - np.asarray(to_rgb(color))) <= tol, axis=-1)


def _lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (0..1) to CIELAB (D65)."""
    a = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = a @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def _count_frames(path, min_side: int = 60) -> int:
    """Panels drawn with a box (the classification plot's): large connected outlines of dark grey pixels."""
    img = _pixels(path)
    v = img.mean(-1)
    mask = ((img.max(-1) - img.min(-1)) < 0.03) & (v > 0.15) & (v < 0.45)
    lab, _ = ndimage.label(mask, structure=np.ones((3, 3)))
    frames = 0
    for sl in ndimage.find_objects(lab):
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        if h < min_side or w < min_side:
            continue
        sub = mask[sl]
        sides = [sub[:3].any(0).mean(), sub[-3:].any(0).mean(), sub[:, :3].any(1).mean(), sub[:, -3:].any(1).mean()]
        frames += sum(s > 0.9 for s in sides) >= 2 and sub.mean() < 0.2  # an outline, not a filled area
    return frames


class _Fitted:
    """The attributes the plots read, with a nearest-component ``predict`` (no EM needed to test drawing)."""

    def __init__(self, means: np.ndarray, scale: float = 1.0, covariance_type: str = "spherical"):
        self.means_ = np.asarray(means, dtype=np.float64)
        k, d = self.means_.shape
        self.n_components = k
        self.n_features_in_ = d
        self.weights_ = np.full(k, 1.0 / k)
        self.covariance_type = covariance_type
        self.covariances_ = np.full(k, scale**2) if covariance_type == "spherical" else np.stack([np.eye(d)] * k)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.argmin(((x[:, None, :] - self.means_[None]) ** 2).sum(-1), axis=1)


def _blobs(k: int, d: int, n: int, seed: int, spread: float = 8.0, stretch: float = 1.0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=spread, size=(k, d))
    means[:, 0] *= stretch
    x = np.vstack([rng.normal(loc=m, size=(n, d)) for m in means])
    return means, x


@pytest.fixture(scope="module")
def single_run():
    """One run, as ``daskem fit`` makes it (uniform rows: EM needs a few iterations; seeded by k-means++,
    because the default's start has already converged on rows this few)."""
    x = np.random.default_rng(3).uniform(size=(2000, 3)) * [4.0, 2.0, 1.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = daskem.GaussianMixture(
            n_components=5, covariance_type="diag", init_params="k-means++", random_state=0
        ).fit(x)
    assert len(gm.runs_) == 1 and len(gm.history_) >= 3
    return gm, x


# ---------------------------------------------------------------- loglik.png


def test_single_run_trajectory_fills_the_plot(tmp_path, single_run):
    gm, _ = single_run
    path = plot_loglik(gm.runs_, tmp_path / "loglik.png")
    img = _pixels(path)
    rows, cols = np.nonzero(_mask(img, component_colors(1)[0]))
    assert rows.size > 200
    # the whole trajectory is visible: from the first iterate down to the last, across most of the height
    assert rows.max() - rows.min() > 0.5 * img.shape[0]
    assert cols.max() - cols.min() > 0.5 * img.shape[1]


def test_thirty_runs_are_grey_but_the_kept_one(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for i in range(30):
        n = int(rng.integers(8, 40))
        final = -3.0 - (0 if i == 7 else rng.uniform(1e-4, 0.2))
        hist = final - 2.0 * np.exp(-0.4 * np.arange(n)) * rng.uniform(0.5, 1.5)
        hist[-1] = final
        runs.append({"tag": {"k": 4, "init": i}, "history": list(hist), "lower_bound": final})
    img = _pixels(plot_loglik(runs, tmp_path / "loglik.png"))
    kept = _mask(img, component_colors(1)[0])
    grey = _mask(img, "0.62", tol=0.01)
    assert kept.sum() > 200 and grey.sum() > 1000
    # no other colour: every saturated pixel is a shade of the kept run's colour (its blend with white or grey)
    sat = (img.max(-1) - img.min(-1)) > 0.15
    hue_kept = np.asarray(to_rgb(component_colors(1)[0]))
    other = sat & ~kept
    dominant = np.argmax(img[other], axis=-1)
    assert np.mean(dominant == np.argmax(hue_kept)) > 0.97


def test_several_k_are_coloured_by_k(tmp_path):
    runs = [
        {
            "tag": {"k": k, "init": i},
            "history": list(-3.0 - 1.0 / (np.arange(10) + 1) ** (1 + 0.1 * i)),
            "lower_bound": -3.0,
        }
        for k in (2, 3, 4, 5)
        for i in range(3)
    ]
    img = _pixels(plot_loglik(runs, tmp_path / "loglik.png", kept_k=3))
    viridis = _plt().get_cmap("viridis")
    for i in range(4):  # one colour per K, in K's order along the sequential map
        assert _mask(img, viridis(0.92 * i / 3)).sum() > 100, i


# ---------------------------------------------------------------- projection.png


@pytest.mark.parametrize("k", [14, 20])
def test_projection_components_have_distinct_colours(tmp_path, k):
    means, x = _blobs(k, 5, 60, seed=k)
    gm = _Fitted(means)
    img = _pixels(plot_projection(gm, x, tmp_path / "projection.png"))
    colors = component_colors(k)
    found = [c for c in colors if _mask(img, c, tol=0.01).sum() >= 20]
    assert len(found) == k  # every component's colour is drawn (markers, legend)
    lab = _lab(np.array([to_rgb(c) for c in colors]))
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1) + np.eye(k) * 1e9
    assert dist.min() > 20  # and they are told apart (CIELAB ΔE)
    assert lab[:, 0].min() > 25  # no black component (the means' markers are outlined in black)


def test_components_past_twenty_repeat_colours_with_another_marker():
    from daskem.report import component_markers

    colors, markers = component_colors(45), component_markers(45)
    pairs = set(zip(colors, markers))
    assert len(set(colors)) == 20 and len(pairs) == 45


def test_projection_uses_the_canvas(tmp_path):
    # PC 1 spread ten times PC 2: an equal aspect would squeeze the points into a flat band
    means, x = _blobs(6, 3, 150, seed=2, spread=4.0, stretch=10.0)
    img = _pixels(plot_projection(_Fitted(means), x, tmp_path / "projection.png"))
    left = img[:, : int(0.65 * img.shape[1])]  # the axes; the legend is on the right
    rows = np.nonzero(((left.max(-1) - left.min(-1)) > 0.15).any(axis=1))[0]
    assert rows.max() - rows.min() > 0.6 * img.shape[0]


def test_labels_do_not_overlap():
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4, 3), layout="constrained")
    rng = np.random.default_rng(0)
    anchors = np.vstack([rng.normal(size=(12, 2)) * 0.3, rng.uniform(-3, 3, size=(12, 2))])  # a crowded centre
    ax.set_xlim(-4, 4)
    ax.set_ylim(-4, 4)
    texts = _place_labels(ax, anchors, [f"{j}" for j in range(24)], component_colors(24))
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in texts]
    assert len(boxes) >= 12
    frame = ax.get_window_extent(renderer)
    for i, a in enumerate(boxes):
        assert frame.x0 - 1 <= a.x0 and a.x1 <= frame.x1 + 1
        assert not any(a.overlaps(b) for b in boxes[i + 1 :])
    plt.close(fig)


# ---------------------------------------------------------------- select_k.png


def _table(models: list[str] | None, ks=range(1, 8), validation: bool = True) -> list[dict]:
    rows = []
    for m_i, m in enumerate(models or [None]):
        for k in ks:
            bic = 1_000_000.0 + 400.0 * (k - 4) ** 2 + 150.0 * m_i
            row = {
                "k": k,
                "train_loglik": -5.0 + 0.1 * min(k, 4) - 0.01 * m_i,
                "validation_loglik": (-5.05 + 0.1 * min(k, 4) - 0.02 * k) if validation else float("nan"),
                "bic": bic,
                "aic": bic - 60.0 * k,
                "n_iter": 5,
                "converged": True,
            }
            if m is not None:
                row["covariance_type"] = m
            rows.append(row)
    return rows


def test_bic_and_aic_differences_show(tmp_path):
    img = _pixels(plot_select_k(_table(None), tmp_path / "select_k.png", best_k=4, criterion="bic"))
    from daskem.report import _PALETTE

    spans = {}
    for name, color in (("bic", _PALETTE[2]), ("aic", _PALETTE[7]), ("train", _PALETTE[0]), ("held out", _PALETTE[3])):
        rows, cols = np.nonzero(_mask(img, color))
        assert rows.size > 100, name
        spans[name] = (cols.min(), cols.max(), rows.max() - rows.min())
    # BIC and AIC each fill their own panel's height (a 1e6 offset on a shared axis would flatten both)
    assert spans["bic"][2] > 0.4 * img.shape[0] and spans["aic"][2] > 0.4 * img.shape[0]
    assert spans["bic"][1] < spans["aic"][0] or spans["aic"][1] < spans["bic"][0]
    # train and held out share the likelihood panel
    assert abs(spans["train"][0] - spans["held out"][0]) < 20


def test_held_out_standard_errors_show_as_bars(tmp_path):
    """Validation's one-standard-error rule made visible: a bar of +-validation_se on each held-out point."""
    from daskem.report import _PALETTE

    plain = _table(None)
    bars = [dict(r, validation_se=0.0 if r["k"] == 4 else 0.08) for r in plain]
    heights = []
    for table, name in ((plain, "plain.png"), (bars, "bars.png")):
        img = _pixels(plot_select_k(table, tmp_path / name, best_k=4, criterion="validation"))
        rows, _ = np.nonzero(_mask(img, _PALETTE[3]))
        heights.append((rows.size, rows.max() - rows.min()))
    # the bars add held-out-coloured pixels and stretch the curve's vertical extent (0.16 in a ~0.4 range)
    assert heights[1][0] > heights[0][0] + 100
    assert heights[1][1] > 1.2 * heights[0][1]


def test_no_held_out_curve_without_validation(tmp_path):
    from daskem.report import _PALETTE

    img = _pixels(plot_select_k(_table(None, validation=False), tmp_path / "s.png", best_k=4, criterion="bic"))
    assert _mask(img, _PALETTE[0]).sum() > 100 and _mask(img, _PALETTE[3]).sum() == 0


@pytest.mark.parametrize("models", [["VII", "VVI", "EEE", "VVV"], ["EII", "VII", "EEI", "VEI", "EVI", "VVI"]])
def test_one_bic_curve_per_covariance_model(tmp_path, models):
    img = _pixels(plot_select_k(_table(models), tmp_path / "s.png", best_k=4, criterion="bic"))
    colors = component_colors(len(models))
    for c in colors:
        rows, cols = np.nonzero(_mask(img, c))
        assert rows.size > 150  # a curve in each panel, not just a legend entry
        assert cols.max() - cols.min() > 0.5 * img.shape[1]
    assert _mask(img, component_colors(len(models) + 1)[-1]).sum() == 0  # and no more models than given


# ---------------------------------------------------------------- classification.png


@pytest.mark.parametrize(("d", "panels"), [(3, 6), (12, 10)])
def test_classification_panels(tmp_path, d, panels):
    """D ≤ 10: every feature; D > 10: the first 4 principal components. m(m+1)/2 panels (pairs and marginals)."""
    means, x = _blobs(4, d, 100, seed=d)
    path = plot_classification(_Fitted(means, covariance_type="full"), x, tmp_path / "classification.png")
    assert _count_frames(path) == panels
    img = _pixels(path)
    for c in component_colors(4):
        assert _mask(img, c, tol=0.01).sum() > 50


def test_write_report_draws_classification(tmp_path, single_run):
    gm, x = single_run
    summary = write_report(tmp_path, gm, x)
    assert summary["plots"]["classification"] == "classification.png"
    assert _count_frames(tmp_path / "classification.png") == 6  # D = 3: 3 pairs and 3 marginals

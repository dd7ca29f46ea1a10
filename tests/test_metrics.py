"""ensembles.metrics against scikit-learn, brute-force references and hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from ensembles import metrics
from ensembles.metrics import (aupro, evaluate_all, f1_max, f1_threshold, image_auroc, pixel_auroc, pixel_f1_max,
                               validation_score)


# ---------------------------------------------------------------------------------------------
# Slow, obviously correct references
# ---------------------------------------------------------------------------------------------


def reference_aupro(maps, masks, fpr_limit=0.3):
    """Threshold by threshold over every distinct score, straight from the definition."""
    maps = [np.asarray(m, dtype=np.float32) for m in maps]
    masks = [np.asarray(k).astype(bool) for k in masks]
    normal_scores = np.concatenate([m[~k] for m, k in zip(maps, masks)])
    regions = []  # the scores of each 8-connected ground-truth region
    for m, k in zip(maps, masks):
        labelled, n = ndimage.label(k, structure=np.ones((3, 3), dtype=int))
        regions += [m[labelled == r] for r in range(1, n + 1)]
    all_scores = np.concatenate([m.ravel() for m in maps])
    fprs, pros = [0.0], [0.0]
    for t in np.unique(all_scores)[::-1]:
        fprs.append(np.count_nonzero(normal_scores >= t) / normal_scores.size)
        pros.append(np.mean([np.count_nonzero(r >= t) / r.size for r in regions]))
    area = 0.0
    for i in range(1, len(fprs)):
        x0, y0, x1, y1 = fprs[i - 1], pros[i - 1], fprs[i], pros[i]
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_limit = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
            break
    return area / fpr_limit


def brute_force_f1_max(scores, labels):
    scores, labels = np.ravel(scores), np.ravel(labels).astype(bool)
    best = 0.0
    for t in np.unique(scores):
        predicted = scores >= t
        tp = np.count_nonzero(predicted & labels)
        fp = np.count_nonzero(predicted & ~labels)
        fn = np.count_nonzero(~predicted & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def sklearn_f1_max(scores, labels):
    precision, recall, _ = precision_recall_curve(np.ravel(labels), np.ravel(scores))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(f1.max())


# ---------------------------------------------------------------------------------------------
# Random data
# ---------------------------------------------------------------------------------------------


def random_scores_with_ties(rng, n, levels):
    """Scores drawn from ``levels`` distinct values (ties) with a mild signal."""
    labels = rng.random(n) < 0.3
    labels[:2] = [False, True]  # both classes present
    scores = np.round(rng.random(n) * levels + labels * levels * 0.3) / levels
    return scores, labels.astype(int)


def random_case(seed, kind, tie_levels=None, sizes=((12, 12), (12, 12), (10, 14), (12, 12))):
    """A few maps with either blob-shaped or salt-and-pepper masks, optionally quantised."""
    rng = np.random.default_rng(seed)
    maps, masks = [], []
    for i, (h, w) in enumerate(sizes):
        if kind == "blobs":
            smooth = ndimage.gaussian_filter(rng.random((h, w)), 1.5)
            mask = smooth > np.quantile(smooth, 0.8)
        else:
            mask = rng.random((h, w)) < 0.25
        if i == 0:
            mask[:] = False  # a normal image among the anomalous ones
        scores = rng.random((h, w)) + 0.5 * mask
        if tie_levels is not None:
            scores = np.round(scores * tie_levels) / tie_levels
        maps.append(scores.astype(np.float32))
        masks.append(mask)
    return maps, masks


@pytest.fixture(params=[metrics._BLOCK_SIZE, 3], ids=["one-block", "tiny-blocks"])
def block_size(request, monkeypatch):
    """Run the pixel metrics both in one block and in many small blocks (ties across cuts)."""
    monkeypatch.setattr(metrics, "_BLOCK_SIZE", request.param)
    return request.param


# ---------------------------------------------------------------------------------------------
# AUROC
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 10, 57, 500, 3000])
@pytest.mark.parametrize("levels", [2, 7, 1000])
def test_image_auroc_matches_sklearn_with_ties(n, levels):
    rng = np.random.default_rng(n * 31 + levels)
    scores, labels = random_scores_with_ties(rng, n, levels)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_accepts_bool_labels_and_lists():
    scores = [0.1, 0.4, 0.35, 0.8, 0.4]
    labels = [False, False, True, True, True]
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tie_levels", [None, 5])
def test_pixel_auroc_matches_sklearn_on_flattened_pixels(seed, tie_levels, block_size):
    maps, masks = random_case(seed, "random", tie_levels)
    expected = roc_auc_score(np.concatenate([k.ravel() for k in masks]),
                             np.concatenate([m.ravel() for m in maps]))
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_of_float64_maps_compares_float32_values():
    rng = np.random.default_rng(5)
    maps = rng.random((3, 20, 20))
    masks = rng.random((3, 20, 20)) < 0.2
    expected = roc_auc_score(masks.ravel(), maps.astype(np.float32).ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# F1-max
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 9, 100, 1000])
@pytest.mark.parametrize("levels", [3, 1000])
def test_image_f1_max_matches_brute_force_and_sklearn(n, levels):
    rng = np.random.default_rng(n + 7 * levels)
    scores, labels = random_scores_with_ties(rng, n, levels)
    value = f1_max(scores, labels)
    assert value == pytest.approx(brute_force_f1_max(scores, labels), abs=1e-12)
    assert value == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_f1_max_matches_brute_force_and_sklearn(seed, block_size):
    maps, masks = random_case(seed, "blobs", tie_levels=8)
    flat_scores = np.concatenate([m.ravel() for m in maps])
    flat_labels = np.concatenate([k.ravel() for k in masks])
    value = pixel_f1_max(maps, masks)
    assert value == pytest.approx(brute_force_f1_max(flat_scores, flat_labels), abs=1e-12)
    assert value == pytest.approx(sklearn_f1_max(flat_scores, flat_labels), abs=1e-12)


# ---------------------------------------------------------------------------------------------
# AUPRO
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ["blobs", "random"])
@pytest.mark.parametrize("tie_levels", [None, 6])
def test_aupro_matches_threshold_by_threshold_reference(seed, kind, tie_levels, block_size):
    maps, masks = random_case(seed, kind, tie_levels)
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


def test_aupro_with_negative_and_signed_zero_scores_matches_reference(block_size):
    # Scores of both signs, with -0.0 and +0.0 (equal scores) on normal and anomalous pixels.
    maps, masks = random_case(2, "blobs")
    maps = [m - np.float32(1.2) for m in maps]
    maps[1][:2] = 0.0
    maps[2][:2] = -0.0
    assert aupro(maps, masks) == pytest.approx(reference_aupro(maps, masks), abs=1e-9)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.5, 1.0])
def test_aupro_other_fpr_limits_match_reference(fpr_limit):
    maps, masks = random_case(11, "blobs", tie_levels=10)
    expected = reference_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_hand_computed_1x4_image():
    # Pixels: [A 0.9 | n 0.1 | n 0.5 | B 0.3], A and B anomalous, not adjacent (two regions).
    # Thresholds, high to low:   FPR   PRO   TP FP
    #   0.9                      0     1/2   1  0
    #   0.5                      1/2   1/2   1  1
    #   0.3                      1/2   1     2  1
    #   0.1                      1     1     2  2
    # AUPRO@0.3: PRO jumps to 1/2 at FPR 0 and stays there up to FPR 1/2 -> 0.3*0.5/0.3 = 0.5.
    # AUROC: pairs (anomalous, normal) ranked right: 0.9>0.1, 0.9>0.5, 0.3>0.1, not 0.3<0.5 -> 3/4.
    # F1 = 2TP/(2TP+FP+FN): 2/3, 2/4, 4/5, 4/6 -> 0.8.
    maps = np.array([[0.9, 0.1, 0.5, 0.3]])
    masks = np.array([[1, 0, 0, 1]], dtype=np.uint8)
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert pixel_auroc(maps, masks) == pytest.approx(0.75, abs=1e-12)
    assert pixel_f1_max(maps, masks) == pytest.approx(0.8, abs=1e-12)


def test_hand_computed_interpolation_at_the_limit():
    # Pixels: normals 0.1 0.2 0.4 0.4 0.4 and one region of two adjacent pixels (0.4, 0.05).
    # Threshold 0.4: FPR 3/5, PRO 1/2 (diagonal segment from (0, 0));  0.2: (4/5, 1/2);
    # 0.1: (1, 1/2);  0.05: (1, 1).
    # @0.3: PRO(0.3) = 0.3 * (0.5 / 0.6) = 0.25, area 0.3 * 0.25 / 2 = 0.0375 -> 0.125.
    # @1.0: 0.6 * 0.5 / 2 + 0.4 * 0.5 = 0.35.
    maps = np.array([[0.1, 0.2, 0.4, 0.4, 0.4, 0.4, 0.05]])
    masks = np.array([[0, 0, 0, 0, 0, 1, 1]], dtype=bool)
    assert aupro(maps, masks) == pytest.approx(0.125, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.35, abs=1e-12)


def test_pro_is_a_mean_over_regions_not_over_pixels():
    # Region A = three pixels at 0.2, region B = one pixel at 0.9, one normal pixel at 0.5.
    # Threshold 0.9: FPR 0, PRO (0 + 1) / 2 = 1/2; 0.5: FPR 1. So AUPRO@0.3 = 1/2
    # (a pixel-weighted recall would give 1/4).
    maps = np.array([[0.2, 0.2, 0.2, 0.5, 0.9]])
    masks = np.array([[1, 1, 1, 0, 1]])
    assert aupro(maps, masks) == pytest.approx(0.5, abs=1e-12)


def test_diagonal_neighbours_form_one_region():
    # 8-connectivity: (0,1) and (1,2) touch diagonally, so the three anomalous pixels are ONE
    # region of size 3 and PRO at threshold 0.9 is 1/3 -> AUPRO 1/3. With 4-connectivity they
    # would be two regions {(0,0),(0,1)} and {(1,2)}, PRO 1/2 -> AUPRO 1/2.
    masks = np.array([[1, 1, 0],
                      [0, 0, 1],
                      [0, 0, 0]], dtype=bool)
    maps = np.where(masks, 0.1, 0.5)
    maps[1, 2] = 0.9
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)


def test_regions_do_not_span_images():
    # One 1x4 image: anomalous [0.9, 0.1, 0.1] form one region, normal 0.5 -> PRO(0.9) = 1/3.
    # Two 1x2 images of the same shape, [0.9 | 0.5] and [0.1, 0.1]: regions {0.9} and
    # {0.1, 0.1} -> PRO(0.9) = 1/2 (labelling the stack as a volume would join them: 1/3).
    one = aupro([np.array([[0.9, 0.1, 0.1, 0.5]])], [np.array([[1, 1, 1, 0]])])
    split = aupro([np.array([[0.9, 0.5]]), np.array([[0.1, 0.1]])],
                  [np.array([[1, 0]]), np.array([[1, 1]])])
    assert one == pytest.approx(1 / 3, abs=1e-12)
    assert split == pytest.approx(1 / 2, abs=1e-12)


def test_constant_scores():
    # One threshold: the curve goes straight from (0, 0) to (1, 1).
    # AUROC = 1/2; PRO = FPR, so AUPRO@0.3 = (0.3^2 / 2) / 0.3 = 0.15;
    # F1 = 2P / (2P + N) with everything predicted anomalous.
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 2:4, 2:5] = True
    masks[1, 6:, :] = True
    maps = np.full(masks.shape, 0.7, dtype=np.float32)
    positives, negatives = masks.sum(), (~masks).sum()
    assert pixel_auroc(maps, masks) == pytest.approx(0.5, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)
    assert pixel_f1_max(maps, masks) == pytest.approx(2 * positives / (2 * positives + negatives))
    assert image_auroc([3.0, 3.0, 3.0], [0, 1, 1]) == pytest.approx(0.5, abs=1e-12)


def test_perfect_maps_score_one():
    maps, masks = random_case(3, "blobs")
    perfect = [k.astype(np.float32) + 0.01 * m for m, k in zip(maps, masks)]
    assert pixel_auroc(perfect, masks) == 1.0
    assert aupro(perfect, masks) == pytest.approx(1.0, abs=1e-12)
    assert pixel_f1_max(perfect, masks) == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Layouts, evaluate_all
# ---------------------------------------------------------------------------------------------


def test_input_layouts_give_the_same_results():
    maps, masks = random_case(4, "blobs", tie_levels=20, sizes=((12, 12),) * 4)
    maps, masks = np.stack(maps), np.stack(masks)

    def all_pixel_metrics(m, k):
        return pixel_auroc(m, k), aupro(m, k), pixel_f1_max(m, k)

    expected = all_pixel_metrics(maps, masks)
    variants = {
        "[N,1,H,W]": (maps[:, None], masks[:, None]),
        "lists, 0/255 uint8 masks": (list(maps), list(masks.astype(np.uint8) * 255)),
        "[1,H,W] items, float masks": ([m[None] for m in maps],
                                       [k[None].astype(np.float32) for k in masks]),
    }
    for name, (variant_maps, variant_masks) in variants.items():
        got = all_pixel_metrics(variant_maps, variant_masks)
        assert got == pytest.approx(expected, abs=1e-12), name
    half = maps.astype(np.float16)
    assert all_pixel_metrics(half, masks) == pytest.approx(
        all_pixel_metrics(half.astype(np.float32), masks), abs=1e-12)


def test_evaluate_all_matches_the_single_metrics():
    maps, masks = random_case(8, "blobs", tie_levels=30)
    scores = np.array([m.max() for m in maps])
    labels = np.array([int(k.any()) for k in masks])
    result = evaluate_all(scores, labels, maps, masks)
    assert list(result) == ["image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"]
    assert result["image_auroc"] == pytest.approx(image_auroc(scores, labels), abs=1e-12)
    assert result["image_f1max"] == pytest.approx(f1_max(scores, labels), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(pixel_auroc(maps, masks), abs=1e-12)
    assert result["aupro"] == pytest.approx(reference_aupro(maps, masks), abs=1e-9)
    assert result["pixel_f1max"] == pytest.approx(pixel_f1_max(maps, masks), abs=1e-12)


def test_moderate_size_run():
    # 20 maps of 512 x 512 (5.2 M pixels): the pixel path without a reference loop.
    rng = np.random.default_rng(0)
    masks = np.zeros((20, 512, 512), dtype=bool)
    for i in range(10):
        masks[i, 100 + 10 * i:180 + 10 * i, 200:260] = True
    maps = rng.random(masks.shape, dtype=np.float32) + 0.5 * masks
    scores = maps.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2)).astype(int)
    result = evaluate_all(scores, labels, maps, masks)
    # Normal ~U(0,1), anomalous ~U(0.5,1.5) (exactness is checked on small cases above):
    # AUROC = P(anomalous > normal) = 1 - 0.5^2 / 2 = 0.875. FPR f <-> threshold 1 - f and
    # PRO = 1/2 + f for every region (f <= 0.3): AUPRO@0.3 = (0.3 * 0.5 + 0.3^2 / 2) / 0.3 = 0.65.
    assert result["pixel_auroc"] == pytest.approx(0.875, abs=0.005)
    assert result["aupro"] == pytest.approx(0.65, abs=0.01)
    assert 0.0 <= result["image_f1max"] <= 1.0 and 0.0 <= result["pixel_f1max"] <= 1.0


# ---------------------------------------------------------------------------------------------
# Undefined metrics and invalid inputs
# ---------------------------------------------------------------------------------------------


def test_no_anomalous_pixel_gives_nan_with_warning():
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    for metric in (pixel_auroc, aupro, pixel_f1_max):
        with pytest.warns(RuntimeWarning, match="no anomalous pixel"):
            assert np.isnan(metric(maps, masks))


def test_no_normal_pixel_gives_nan_auroc_but_defined_f1():
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.ones((2, 4, 4), dtype=bool)
    for metric in (pixel_auroc, aupro):
        with pytest.warns(RuntimeWarning, match="no normal pixel"):
            assert np.isnan(metric(maps, masks))
    assert pixel_f1_max(maps, masks) == 1.0  # everything anomalous: precision 1 at recall 1


def test_single_class_image_labels_give_nan_with_warning():
    with pytest.warns(RuntimeWarning, match="no anomalous image"):
        assert np.isnan(image_auroc([0.1, 0.2], [0, 0]))
    with pytest.warns(RuntimeWarning, match="no anomalous image"):
        assert np.isnan(f1_max([0.1, 0.2], [0, 0]))
    with pytest.warns(RuntimeWarning, match="no normal image"):
        assert np.isnan(image_auroc([0.1, 0.2], [1, 1]))


def test_evaluate_all_on_a_class_without_defects_returns_nans():
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    with pytest.warns(RuntimeWarning):
        result = evaluate_all([0.1, 0.2], [0, 0], maps, masks)
    assert all(np.isnan(v) for v in result.values())


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "inf")])
def test_non_finite_maps_raise_a_clear_error(bad, word):
    maps = np.random.default_rng(0).random((2, 4, 4))
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[1, 0, 0] = True
    maps[1, 2, 3] = bad
    for metric in (pixel_auroc, aupro, pixel_f1_max):
        with pytest.raises(ValueError, match=rf"maps \(maps\[1\]\) contain {word}.*model's output"):
            metric(maps, masks)


def test_nan_image_scores_raise():
    with pytest.raises(ValueError, match="scores contain NaN"):
        image_auroc([0.1, np.nan], [0, 1])


def test_mismatched_shapes_raise_a_clear_error():
    maps = np.zeros((2, 8, 8))
    masks = np.zeros((2, 16, 16), dtype=bool)
    with pytest.raises(ValueError, match=r"maps\[0\] has shape \(8, 8\).*\(16, 16\).*mask"
                                         r".*resolution.*resize"):
        aupro(maps, masks)
    with pytest.raises(ValueError, match="maps has 2 images but masks has 1"):
        pixel_auroc(maps, masks[:1, :8, :8])
    with pytest.raises(ValueError, match="scores has 3 values but labels has 2"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])


def test_invalid_masks_labels_and_limits_raise():
    maps = np.zeros((1, 4, 4))
    with pytest.raises(ValueError, match="between 0 and 1.*binarise"):
        pixel_auroc(maps, np.full((1, 4, 4), 0.5))
    with pytest.raises(ValueError, match="negative"):
        pixel_auroc(maps, -np.ones((1, 4, 4), dtype=int))
    with pytest.raises(ValueError, match="labels must be 0"):
        image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, np.ones((1, 4, 4)), fpr_limit=0.0)
    with pytest.raises(ValueError, match="maps must have shape"):
        pixel_auroc(np.zeros(5), np.zeros(5))


def test_f1_threshold_reaches_f1_max_and_validation_score_is_the_mean():
    rng = np.random.default_rng(3)
    scores = np.round(rng.random(200), 2)  # many ties: a threshold keeps or drops a whole tie
    labels = (rng.random(200) < 0.3).astype(int)
    t = f1_threshold(scores, labels)
    pred = scores >= t
    assert t in scores
    assert 2 * (pred & (labels == 1)).sum() / (pred.sum() + labels.sum()) == pytest.approx(f1_max(scores, labels))
    assert validation_score(0.9, 0.7) == (0.9 + 0.7) / 2

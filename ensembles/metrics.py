"""Evaluation metrics: the one place in the project where they are computed.

Image level (one score per image): :func:`image_auroc` and :func:`f1_max`.
Pixel level (every pixel of every image of a class, pooled): :func:`pixel_auroc`,
:func:`aupro` (AUPRO@0.3, MVTec AD's official definition) and :func:`pixel_f1_max`.
:func:`evaluate_all` computes all five, sorting the pixels once.
Selection helpers: :func:`validation_score` (the ``val_score`` of a search and of the fusion
choice) and :func:`f1_threshold` (the F1-optimal image threshold on a validation set).

Conventions shared by every metric
----------------------------------
* Higher score = more anomalous. At threshold ``t`` a pixel (image) is predicted anomalous
  when ``score >= t``.
* Curves are exact: every distinct score is a threshold; equal scores form one curve point,
  and the curve starts at (0, 0) (threshold above the maximum). Using ``>`` instead of ``>=``
  would give the same set of points (each labelled with the next threshold), so the areas
  and F1-max do not depend on the convention; it only decides which threshold a point has.
* AUROC is the trapezoid under that ROC curve, which equals the Mann-Whitney statistic with
  ties counted 1/2 (average ranks) and scikit-learn's ``roc_auc_score``. It is summed in
  integers (twice the area, in units of one normal x one anomalous count) and divided once.
* AUPRO@``fpr_limit``: ground-truth regions are the 8-connected components of each image's
  mask (``scipy.ndimage.label`` with a 3x3 ones structure; regions never span two images).
  FPR(t) = normal pixels (of all images) with score >= t / all normal pixels.
  PRO(t) = mean over all regions of the fraction of the region's pixels with score >= t.
  PRO is integrated over FPR in [0, fpr_limit] by the trapezoid rule, with PRO linearly
  interpolated at exactly ``fpr_limit``, and divided by ``fpr_limit``.
* F1-max: the maximum over thresholds of 2 TP / (2 TP + FP + FN), i.e. the best point of the
  precision-recall curve.
* Pixel scores are compared in float32 (float64 maps are rounded to float32, so values closer
  than float32 resolution tie); image scores are compared in float64.

Undefined metrics
-----------------
A class without any anomalous pixel (or image) has no AUROC, AUPRO or F1-max; one without
any normal pixel (image) has no AUROC or AUPRO. These return ``float('nan')`` and emit a
``RuntimeWarning`` naming the cause, so an evaluation table shows NaN instead of a whole run
failing. Invalid inputs (NaN/inf scores, maps and masks of different shapes, non-binary
masks, labels other than 0/1) raise ``ValueError`` naming the argument.

Memory (pixel metrics)
----------------------
No index array over all pixels is ever built. The normal pixels' scores are copied once into
one float32 array and sorted in place (4 bytes per normal pixel). The anomalous pixels' scores
(float32) and, for AUPRO, their region ids (int32) are kept too (8 bytes per anomalous pixel);
only these are sorted together with their region ids (16 bytes per anomalous pixel at peak).
The curve is then walked through its corners only, one pair per distinct anomalous score (see
``_curve_blocks``), a block of about ``_BLOCK_SIZE`` anomalous scores at a time (about 200
bytes per score in the block, ~50 MB at the default 2**18), and consumed by the metrics on the
fly without being stored. Per image, a few temporaries of the image's size (a float32 copy if
the map is not float32, a bool mask, int32 region labels) come and go. Equal anomalous scores
always share a block, so a huge group of them (e.g. maps saturated at 1 inside defects) makes
one large block, at about 25 bytes per tied score.
Measured on 150 maps of 1024x1024 (157 M pixels, 1.7 % anomalous): about 4.4 bytes per pixel
at peak on top of the inputs.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

ArrayOrList = Union[np.ndarray, Sequence[np.ndarray]]

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Anomalous scores per curve block: bounds the working memory of the curve walk
# (about 200 bytes per score in the block).
_BLOCK_SIZE = 1 << 18


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def image_auroc(scores, labels) -> float:
    """Area under the ROC curve of image scores (``labels``: 1 anomalous, 0 normal).

    Identical to ``sklearn.metrics.roc_auc_score(labels, scores)`` including ties. NaN (with a
    RuntimeWarning) when only one class is present. Memory: a few float64 copies of ``scores``.
    """
    ranked = _sorted_image_scores(scores, labels)
    return _curve_metrics(ranked, "image", auroc="image AUROC")["image AUROC"]


def f1_max(scores, labels) -> float:
    """Maximum F1 over every distinct threshold of the image scores (1 = anomalous).

    NaN (with a RuntimeWarning) when no image is anomalous.
    """
    ranked = _sorted_image_scores(scores, labels)
    return _curve_metrics(ranked, "image", f1="image F1-max")["image F1-max"]


def pixel_auroc(maps: ArrayOrList, masks: ArrayOrList) -> float:
    """Area under the ROC curve over all pixels of all images, pooled.

    ``maps``: anomaly maps at mask resolution, an array ``[N, H, W]`` / ``[N, 1, H, W]`` /
    ``[H, W]`` or a list of ``[H, W]`` / ``[1, H, W]`` arrays (float16/32/64; sizes may differ
    between images). ``masks``: the ground truth in the same layout, bool, or numeric with 0 =
    normal and a positive value (1 or 255) = anomalous.

    Memory: 4 bytes per pixel (float32 scores, sorted in place) + the block working memory
    (see the module docstring); the inputs are not copied as a whole.
    """
    ranked = _sorted_pixel_scores(maps, masks, with_regions=False)
    return _curve_metrics(ranked, "pixel", auroc="pixel AUROC")["pixel AUROC"]


def aupro(maps: ArrayOrList, masks: ArrayOrList, fpr_limit: float = 0.3) -> float:
    """Normalised area under the per-region-overlap curve up to FPR ``fpr_limit`` (MVTec AD).

    See the module docstring for the exact definition (8-connected regions per image, FPR over
    all normal pixels, PRO = mean over all regions, trapezoid to ``fpr_limit`` with linear
    interpolation, divided by ``fpr_limit``). Constant maps give the diagonal PRO = FPR, hence
    ``fpr_limit / 2``. Inputs as in :func:`pixel_auroc`.

    Memory: 4 bytes per normal pixel + 8 per anomalous pixel (float32 score, int32 region id;
    16 while sorting) + block working memory. The curve walk stops at ``fpr_limit``.
    """
    _check_fpr_limit(fpr_limit)
    ranked = _sorted_pixel_scores(maps, masks, with_regions=True)
    return _curve_metrics(ranked, "pixel", aupro="AUPRO", fpr_limit=fpr_limit)["AUPRO"]


def pixel_f1_max(maps: ArrayOrList, masks: ArrayOrList) -> float:
    """Maximum F1 over every distinct threshold of all pixels, pooled.

    Inputs as in :func:`pixel_auroc`. Memory: 4 bytes per pixel + block working memory.
    """
    ranked = _sorted_pixel_scores(maps, masks, with_regions=False)
    return _curve_metrics(ranked, "pixel", f1="pixel F1-max")["pixel F1-max"]


def evaluate_all(scores, labels, maps: ArrayOrList, masks: ArrayOrList,
                 fpr_limit: float = 0.3) -> dict[str, float]:
    """All metrics of one class: image AUROC and F1-max, pixel AUROC, AUPRO and F1-max.

    Returns ``{"image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max"}``.
    The pixels are sorted once and one walk along the curve feeds the three pixel metrics.
    Memory: as :func:`aupro` (4 bytes per normal pixel, 8-16 per anomalous pixel).
    """
    _check_fpr_limit(fpr_limit)
    image = _curve_metrics(_sorted_image_scores(scores, labels), "image",
                           auroc="image_auroc", f1="image_f1max")
    pixel = _curve_metrics(_sorted_pixel_scores(maps, masks, with_regions=True), "pixel",
                           auroc="pixel_auroc", aupro="aupro", f1="pixel_f1max",
                           fpr_limit=fpr_limit)
    merged = {**image, **pixel}
    return {key: merged[key]
            for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1max", "pixel_f1max")}


def validation_score(image_auroc: float, pixel_auroc: float) -> float:
    """The validation score a search maximises and the fusion is chosen by (``val_score``): the
    mean of image AUROC and pixel AUROC."""
    return (image_auroc + pixel_auroc) / 2


def f1_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The image threshold with the best F1 on the validation set (score >= t is anomalous)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[s[1:] != s[:-1], True]  # one point per distinct score
    f1 = 2 * tp / (tp + fp + y.sum())
    best = int(np.argmax(np.where(last, f1, -1)))
    return float(s[best])


# ---------------------------------------------------------------------------------------------
# Sorted scores, split by ground truth
# ---------------------------------------------------------------------------------------------


@dataclass
class _SortedScores:
    """Scores of normal and of anomalous samples, each sorted ascending."""

    normal: np.ndarray
    anomalous: np.ndarray
    # For AUPRO: region id (int32) of each anomalous score, in the same order, and
    # 1 / region size (float64) per region id.
    region: Optional[np.ndarray] = None
    inverse_region_size: Optional[np.ndarray] = None

    @property
    def n_regions(self) -> int:
        return 0 if self.inverse_region_size is None else self.inverse_region_size.size


def _sorted_image_scores(scores, labels) -> _SortedScores:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = np.asarray(labels).ravel()
    if scores.size != labels.size:
        raise ValueError(f"scores has {scores.size} values but labels has {labels.size}; "
                         "give one score and one label per image")
    _raise_if_not_finite(scores, "scores")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 (normal) or 1 (anomalous); got values "
                         f"{np.unique(labels)[:10].tolist()}")
    anomalous = labels.astype(bool)
    return _SortedScores(normal=np.sort(scores[~anomalous]), anomalous=np.sort(scores[anomalous]))


def _sorted_pixel_scores(maps: ArrayOrList, masks: ArrayOrList,
                         with_regions: bool) -> _SortedScores:
    """Copy every map's pixels into one float32 array per ground-truth class and sort them.

    Two passes over the images so that the output arrays are allocated once at their final
    size: the first checks shapes and masks and counts anomalous pixels, the second copies.
    """
    map_list = _as_image_list(maps, "maps")
    mask_list = _as_image_list(masks, "masks")
    if len(map_list) != len(mask_list):
        raise ValueError(f"maps has {len(map_list)} images but masks has {len(mask_list)}")
    if not map_list:
        raise ValueError("maps is empty: give at least one anomaly map")
    anomalous_counts = []
    for i, (anomaly_map, mask) in enumerate(zip(map_list, mask_list)):
        if anomaly_map.shape != mask.shape:
            raise ValueError(
                f"maps[{i}] has shape {anomaly_map.shape} but masks[{i}] has shape {mask.shape}: "
                "maps must be at mask (ground-truth) resolution; resize the maps first "
                "(e.g. bilinear interpolation to the mask size)")
        anomalous_counts.append(int(np.count_nonzero(_binary_mask(mask, i))))
    n_pixels = sum(m.size for m in map_list)
    n_anomalous = sum(anomalous_counts)
    normal = np.empty(n_pixels - n_anomalous, dtype=np.float32)
    anomalous = np.empty(n_anomalous, dtype=np.float32)
    region = np.empty(n_anomalous, dtype=np.int32) if with_regions else None
    inverse_sizes: list[np.ndarray] = []
    n_regions = 0
    at_normal = at_anomalous = 0
    for i, (anomaly_map, mask, count) in enumerate(zip(map_list, mask_list, anomalous_counts)):
        values = np.asarray(anomaly_map, dtype=np.float32)
        _raise_if_not_finite(values, f"maps (maps[{i}])")
        is_anomalous = _binary_mask(mask, i)
        normal[at_normal:at_normal + values.size - count] = values[~is_anomalous]
        anomalous[at_anomalous:at_anomalous + count] = values[is_anomalous]
        if with_regions and count:
            labelled, n_here = ndimage.label(is_anomalous, structure=_EIGHT_CONNECTED)
            ids = labelled[is_anomalous]  # 1..n_here, in the same order as the scores
            del labelled
            sizes = np.bincount(ids, minlength=n_here + 1)[1:]
            region[at_anomalous:at_anomalous + count] = ids + (n_regions - 1)
            inverse_sizes.append(1.0 / sizes)
            n_regions += n_here
        at_normal += values.size - count
        at_anomalous += count
    normal.sort()
    if with_regions:
        anomalous, region = _sort_carrying_ids(anomalous, region)
        inverse_region_size = (np.concatenate(inverse_sizes) if inverse_sizes
                               else np.empty(0, dtype=np.float64))
        return _SortedScores(normal, anomalous, region, inverse_region_size)
    anomalous.sort()
    return _SortedScores(normal, anomalous)


def _sort_carrying_ids(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort float32 ``scores`` ascending and reorder int32 ``ids`` (>= 0) alike, without argsort.

    Each pair is packed into one uint64: the score's bits in the high half, mapped so that
    unsigned order is float order (flip every bit of negatives, the sign bit of the others),
    and the id in the low half. One in-place sort of these keys replaces an argsort and two
    gathers: about 2x faster, 16 instead of 20 bytes per score at peak. Overwrites ``scores``.
    (-0.0 and +0.0 get the adjacent keys 0x7FFFFFFF and 0x80000000: still sorted together.)
    """
    bits = scores.view(np.uint32)
    bits ^= (bits >> 31) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000)
    keys = bits.astype(np.uint64)
    del scores, bits
    keys <<= np.uint64(32)
    keys |= ids.view(np.uint32)
    del ids
    keys.sort()
    halves = keys.view(np.uint32).reshape(-1, 2)
    low, high = (0, 1) if sys.byteorder == "little" else (1, 0)
    sorted_ids = halves[:, low].copy().view(np.int32)
    bits = halves[:, high].copy()
    del keys, halves
    bits ^= ((bits >> 31) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000)
    return bits.view(np.float32), sorted_ids


def _as_image_list(x: ArrayOrList, name: str) -> list[np.ndarray]:
    """Split ``[N,H,W]``, ``[N,1,H,W]``, ``[H,W]`` or a list of ``[H,W]``/``[1,H,W]`` images."""
    if isinstance(x, (list, tuple)):
        images = []
        for i, item in enumerate(x):
            image = np.asarray(item)
            if image.ndim == 3 and image.shape[0] == 1:
                image = image[0]
            if image.ndim != 2:
                raise ValueError(f"{name}[{i}] must be a 2-D [H, W] (or [1, H, W]) array, "
                                 f"got shape {image.shape}")
            images.append(image)
        return images
    array = np.asarray(x)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        return [array]
    if array.ndim == 3:
        return list(array)
    raise ValueError(f"{name} must have shape [N, H, W], [N, 1, H, W] or [H, W] "
                     f"(or be a list of [H, W] arrays), got shape {array.shape}")


def _binary_mask(mask: np.ndarray, index: int) -> np.ndarray:
    """Ground truth as bool: 0 = normal, positive (1, 255, True) = anomalous."""
    if mask.dtype == bool:
        return mask
    if not np.issubdtype(mask.dtype, np.number):
        raise ValueError(f"masks[{index}] has dtype {mask.dtype}; give bool or numeric masks")
    if np.issubdtype(mask.dtype, np.floating):
        if not np.isfinite(mask).all():
            raise ValueError(f"masks[{index}] contains NaN or inf")
        if ((mask > 0) & (mask < 1)).any():
            raise ValueError(f"masks[{index}] has values strictly between 0 and 1 (a soft or "
                             "interpolated mask); binarise it first, e.g. mask > 0.5")
    if (mask < 0).any():
        raise ValueError(f"masks[{index}] has negative values; use 0 = normal, 1 = anomalous")
    return mask > 0


def _raise_if_not_finite(values: np.ndarray, name: str) -> None:
    if np.isfinite(values).all():
        return
    what = "NaN" if np.isnan(values).any() else "inf"
    if what == "inf" and values.dtype == np.float32:
        what += " (or values beyond the float32 range)"
    raise ValueError(f"{name} contain {what}; check the model's output (e.g. a division by "
                     "zero or an overflow in the anomaly map)")


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")


# ---------------------------------------------------------------------------------------------
# The curve: its corner points (cumulative counts), highest threshold first, in blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class _CurveBlock:
    """Consecutive corner points of the curve, in order of decreasing threshold."""

    false_positives: np.ndarray  # int64: normal scores >= threshold
    true_positives: np.ndarray  # int64: anomalous scores >= threshold
    # float64: sum over the anomalous scores >= threshold of 1 / |their region| (AUPRO only)
    region_overlap: Optional[np.ndarray]


def _curve_blocks(ranked: _SortedScores) -> Iterator[_CurveBlock]:
    """The exact curve, reduced to its corners, a block of anomalous scores at a time.

    Between two consecutive distinct anomalous scores ``a > b`` only normal samples cross the
    threshold, so TP and region overlap stay constant while FP grows: those curve points lie on
    a horizontal segment, add nothing to any area (nor to the interpolation at the FPR limit)
    and have a lower F1 than the segment's left end. The curve is therefore exactly the
    polyline through, for each distinct anomalous score ``a`` (descending), the two corners

        (FP = #normal > a,  TP and overlap of the threshold above)
        (FP = #normal >= a, TP and overlap at a)          (a diagonal when normals tie with a)

    followed by the point where every sample is predicted anomalous. FP counts come from
    binary searches in the sorted normal scores, so the normal scores are never walked.
    Blocks are cut by value (about ``_BLOCK_SIZE`` anomalous scores each), so ties never
    straddle two blocks.
    """
    normal, anomalous = ranked.normal, ranked.anomalous
    end = anomalous.size
    true_above, overlap_above = 0, 0.0
    while end > 0:
        start = 0
        if end > _BLOCK_SIZE:
            start = int(np.searchsorted(anomalous[:end], anomalous[end - _BLOCK_SIZE], "left"))
        block = anomalous[start:end]
        first = _first_index_of_each_value(block)
        values = block[first]  # ascending keys: searchsorted reuses the previous bound
        normal_above = normal.size - np.searchsorted(normal, values, "right")[::-1]
        normal_at_or_above = normal.size - np.searchsorted(normal, values, "left")[::-1]
        first = first[::-1]  # from here on, highest threshold first
        true_positives = true_above + (block.size - first)
        overlap = previous_overlap = None
        if ranked.region is not None:
            weights = ranked.inverse_region_size[ranked.region[start:end]]
            suffix_sums = np.append(np.cumsum(weights[::-1])[::-1], 0.0)
            overlap = overlap_above + suffix_sums[first]
            previous_overlap = np.concatenate(([overlap_above], overlap[:-1]))
            overlap_above += float(suffix_sums[0])
        yield _CurveBlock(
            false_positives=_interleave(normal_above, normal_at_or_above),
            true_positives=_interleave(
                np.concatenate(([true_above], true_positives[:-1])), true_positives),
            region_overlap=None if overlap is None else _interleave(previous_overlap, overlap),
        )
        true_above += block.size
        end = start
    yield _CurveBlock(
        false_positives=np.array([normal.size]),
        true_positives=np.array([anomalous.size]),
        region_overlap=None if ranked.region is None else np.array([overlap_above]),
    )


def _first_index_of_each_value(sorted_values: np.ndarray) -> np.ndarray:
    starts = np.empty(sorted_values.size, dtype=bool)
    starts[:1] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def _interleave(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.empty(a.size + b.size, dtype=np.result_type(a, b))
    out[0::2], out[1::2] = a, b
    return out


# ---------------------------------------------------------------------------------------------
# Metrics consuming the curve block by block
# ---------------------------------------------------------------------------------------------


class _RocArea:
    """Trapezoid area under (FP, TP), accumulated exactly in integers while it fits in int64."""

    def __init__(self, n_normal: int, n_anomalous: int):
        self.denominator = 2 * n_normal * n_anomalous
        self.exact = self.denominator < 2**62
        self.twice_area = 0
        self.last_fp = self.last_tp = 0
        self.done = False

    def add(self, block: _CurveBlock) -> None:
        fp, tp = block.false_positives, block.true_positives
        widths = np.diff(fp, prepend=self.last_fp)
        heights = tp + np.concatenate(([self.last_tp], tp[:-1]))  # twice the mean height
        if self.exact:
            self.twice_area += int(np.dot(widths, heights))
        else:
            self.twice_area += float(np.dot(widths.astype(np.float64), heights.astype(np.float64)))
        self.last_fp, self.last_tp = int(fp[-1]), int(tp[-1])

    def result(self) -> float:
        return self.twice_area / self.denominator


class _ProArea:
    """Area under PRO(FPR) on [0, fpr_limit] divided by fpr_limit; stops past the limit."""

    def __init__(self, n_normal: int, n_regions: int, fpr_limit: float):
        self.n_normal, self.n_regions, self.limit = n_normal, n_regions, fpr_limit
        self.area = 0.0
        self.last_fpr = self.last_pro = 0.0
        self.done = False

    def add(self, block: _CurveBlock) -> None:
        fpr = np.concatenate(([self.last_fpr], block.false_positives / self.n_normal))
        pro = np.concatenate(([self.last_pro], block.region_overlap / self.n_regions))
        past = int(np.searchsorted(fpr, self.limit, "right"))  # first point with FPR > limit
        if past == fpr.size:
            self.area += _trapezoid(fpr, pro)
            self.last_fpr, self.last_pro = float(fpr[-1]), float(pro[-1])
            return
        # fpr[0] (the previous point) is <= limit, so past >= 1.
        self.area += _trapezoid(fpr[:past], pro[:past])
        x0, y0, x1, y1 = fpr[past - 1], pro[past - 1], fpr[past], pro[past]
        pro_at_limit = y0 + (y1 - y0) * (self.limit - x0) / (x1 - x0)
        self.area += (self.limit - x0) * (y0 + pro_at_limit) / 2.0
        self.done = True

    def result(self) -> float:
        return float(self.area / self.limit)


class _F1Max:
    """max over thresholds of F1 = 2 TP / (TP + FP + P), P = number of anomalous samples."""

    def __init__(self, n_anomalous: int):
        self.n_anomalous = n_anomalous
        self.best = 0.0
        self.done = False

    def add(self, block: _CurveBlock) -> None:
        tp = block.true_positives
        f1 = 2.0 * tp / (tp + block.false_positives + self.n_anomalous)
        self.best = max(self.best, float(f1.max()))

    def result(self) -> float:
        return self.best


def _trapezoid(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(np.diff(x), y[1:] + y[:-1]) / 2.0)


def _curve_metrics(ranked: _SortedScores, level: str, *, auroc: Optional[str] = None,
                   aupro: Optional[str] = None, f1: Optional[str] = None,
                   fpr_limit: float = 0.3) -> dict[str, float]:
    """Compute the requested metrics (given by their result keys) in one walk along the curve."""
    n_normal, n_anomalous = ranked.normal.size, ranked.anomalous.size
    unit = "pixel" if level == "pixel" else "image"
    no_anomalous = None if n_anomalous else f"no anomalous {unit} in the ground truth"
    no_normal = None if n_normal else f"no normal {unit} in the ground truth"
    results: dict[str, float] = {}
    metrics = {}
    requested = [
        (auroc, no_anomalous or no_normal, lambda: _RocArea(n_normal, n_anomalous)),
        (aupro, no_anomalous or no_normal, lambda: _ProArea(n_normal, ranked.n_regions, fpr_limit)),
        (f1, no_anomalous, lambda: _F1Max(n_anomalous)),
    ]
    for key, undefined_because, make in requested:
        if key is None:
            continue
        if undefined_because:
            warnings.warn(f"{key} is undefined: {undefined_because}; returning NaN",
                          RuntimeWarning, stacklevel=3)
            results[key] = float("nan")
        else:
            metrics[key] = make()
    if metrics:
        for block in _curve_blocks(ranked):
            for metric in metrics.values():
                if not metric.done:
                    metric.add(block)
            if all(metric.done for metric in metrics.values()):
                break
    results.update({key: metric.result() for key, metric in metrics.items()})
    return results

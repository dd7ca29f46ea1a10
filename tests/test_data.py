"""Readers, synthetic data, validation set and bad input."""

import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from anomaly_data import (DatasetError, load_records, prepare_splits, read_folder_root, read_mvtec, read_visa)
from anomaly_data.synthetic import CLASSES, generate_dataset
from anomaly_data.transforms import resize_mask


def save(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_mvtec(root, cls="bottle"):
    """A tiny MVTec-layout class with grayscale, RGBA and odd-sized images."""
    c = root / cls
    save(c / "train/good/000.png", rgb(40, 50, 1))
    save(c / "train/good/001.png", rgb(40, 50, 2)[..., 0])          # grayscale
    rgba = np.dstack([rgb(30, 30, 3), np.full((30, 30), 255, np.uint8)])
    save(c / "train/good/002.png", rgba)                            # RGBA
    save(c / "test/good/000.png", rgb(40, 50, 4))
    save(c / "test/crack/000.png", rgb(40, 50, 5))
    mask = np.zeros((40, 50), np.uint8)
    mask[5:9, 10:20] = 255
    mask[30, 40] = 1                                                # any non-zero is anomalous
    save(c / "ground_truth/crack/000_mask.png", mask)
    return c


def test_mvtec_reader_records_and_loading(tmp_path):
    make_mvtec(tmp_path)
    data = read_mvtec(tmp_path)
    assert list(data) == ["bottle"]
    recs = data["bottle"]
    assert len(recs.train) == 3 and len(recs.test) == 2
    bad = [r for r in recs.test if r.label == 1]
    assert bad[0].defect == "crack" and bad[0].mask_path.name == "000_mask.png"
    ds = load_records(recs.train + recs.test, ["bottle"], 32)
    assert ds.images.shape == (5, 32, 32, 3) and ds.images.dtype == np.uint8
    item = ds[3]  # test folders are read in name order: crack before good
    assert item["image"].shape == (3, 32, 32) and 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["label"] == 1 and item["defect"] == "crack" and item["class_name"] == "bottle"
    assert item["mask"].sum() > 0 and set(np.unique(item["mask"].numpy())) <= {0.0, 1.0}
    assert ds[0]["mask"].sum() == 0 and ds[4]["label"] == 0


def test_mvtec_bad_input_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        read_mvtec(tmp_path / "missing")
    with pytest.raises(DatasetError, match="no class folder"):
        read_mvtec(tmp_path)
    c = make_mvtec(tmp_path)
    with pytest.raises(DatasetError, match=r"unknown class\(es\) \['cable'\]"):
        read_mvtec(tmp_path, ["cable"])
    # an anomalous image without its mask
    save(c / "test/hole/000.png", rgb(40, 50, 6))
    with pytest.raises(DatasetError, match=r"test/hole/000.png has no mask"):
        read_mvtec(tmp_path)
    # a mask whose size differs from its image
    save(c / "ground_truth/hole/000_mask.png", np.zeros((20, 20), np.uint8))
    recs = read_mvtec(tmp_path)["bottle"]
    with pytest.raises(DatasetError, match=r"000_mask.png is 20x20 but its image .* is 50x40"):
        load_records(recs.test, ["bottle"], 32)


def test_empty_class_folder(tmp_path):
    (tmp_path / "screw/train/good").mkdir(parents=True)
    with pytest.raises(DatasetError, match="holds no image"):
        read_mvtec(tmp_path)


def test_corrupt_image_error_and_skip(tmp_path, caplog):
    c = make_mvtec(tmp_path)
    (c / "train/good/003.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    recs = read_mvtec(tmp_path)["bottle"]
    with pytest.raises(DatasetError, match=r"cannot read image .*003.png.*--skip-bad-images"):
        load_records(recs.train, ["bottle"], 16)
    with caplog.at_level(logging.WARNING):
        ds = load_records(recs.train, ["bottle"], 16, skip_bad_images=True)
    assert len(ds) == 3 and len(ds.skipped) == 1 and ds.skipped[0].endswith("003.png")
    assert "skipped 1 unreadable" in caplog.text


def write_visa(root):
    """VisA as released: JPG images, masks with values other than 255, split_csv/1cls.csv."""
    rows = []
    for i in range(3):
        p = f"candle/Data/Images/Normal/{i:04d}.JPG"
        save(root / p, rgb(24, 36, i))
        rows.append(["candle", "train" if i < 2 else "test", "normal", p, ""])
    p, m = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    save(root / p, rgb(24, 36, 9))
    mask = np.zeros((24, 36), np.uint8)
    mask[3:6, 4:8] = 7
    save(root / m, mask)
    rows.append(["candle", "test", "anomaly", p, m])
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv/1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return rows


def test_visa_csv_reader(tmp_path):
    write_visa(tmp_path)
    data = read_visa(tmp_path)
    recs = data["candle"]
    assert len(recs.train) == 2 and len(recs.test) == 2
    ds = load_records(recs.test, ["candle"], (24, 36))
    anomalous = ds[1]
    assert anomalous["label"] == 1 and anomalous["mask"].sum() == 12  # 3x4 pixels of value 7


def test_visa_rejects_paths_leaving_root(tmp_path):
    rows = write_visa(tmp_path)
    with open(tmp_path / "split_csv/1cls.csv", "a", newline="") as f:
        csv.writer(f).writerow(["candle", "train", "normal", "../outside.JPG", ""])
    with pytest.raises(DatasetError, match=r"row 6: path '../outside.JPG' leaves the dataset root"):
        read_visa(tmp_path)
    assert rows


def test_visa_converted_layout(tmp_path):
    c = tmp_path / "pcb1"
    save(c / "train/good/0000.JPG", rgb(20, 20))
    save(c / "train/good/0001.JPG", rgb(20, 20, 1))
    save(c / "test/bad/000.JPG", rgb(20, 20, 2))
    save(c / "ground_truth/bad/000.png", np.full((20, 20), 255, np.uint8))  # no _mask suffix
    recs = read_visa(tmp_path)["pcb1"]
    assert recs.test[0].mask_path.name == "000.png"


def test_not_a_dataset_root(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DatasetError, match="not a VisA root"):
        read_visa(tmp_path)


def test_folder_reader(tmp_path):
    for i in range(5):
        save(tmp_path / "mine/normal" / f"n{i}.png", rgb(16, 16, i))
    save(tmp_path / "mine/abnormal/a0.png", rgb(16, 16, 10))
    save(tmp_path / "mine/masks/a0.png", np.full((16, 16), 255, np.uint8))
    recs = read_folder_root(tmp_path / "mine")["mine"]
    assert len(recs.train) == 4 and sum(r.label == 0 for r in recs.test) == 1
    assert [r.mask_path.name for r in recs.test if r.label] == ["a0.png"]
    save(tmp_path / "mine/abnormal/a1.png", rgb(16, 16, 11))
    with pytest.raises(DatasetError, match="a1.png has no mask"):
        read_folder_root(tmp_path / "mine")


def test_synthetic_generator_cli_and_determinism(tmp_path):
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, "-m", "anomaly_data.synthetic", str(out), "--classes", "brick,washer",
                        "--image-size", "48", "--train", "3", "--test-good", "1", "--test-per-defect", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = read_mvtec(out)
    assert list(data) == ["brick", "washer"]
    washer = data["washer"]
    assert {r.defect for r in washer.test} == {"good", "scratch", "stain", "contamination", "missing_part"}
    ds = load_records(washer.test, ["brick", "washer"], 48)
    for i in range(len(ds)):
        assert (ds.masks[i].sum() > 0) == bool(ds.labels[i])
    again = generate_dataset(tmp_path / "again", ["washer"], 0, 48, 3, 1, 1)
    other = generate_dataset(tmp_path / "other", ["washer"], 1, 48, 3, 1, 1)
    a = np.asarray(Image.open(out / "washer/test/stain/000.png"))
    assert np.array_equal(a, np.asarray(Image.open(again / "washer/test/stain/000.png")))
    assert not np.array_equal(a, np.asarray(Image.open(other / "washer/test/stain/000.png")))
    r = subprocess.run([sys.executable, "-m", "anomaly_data.synthetic", str(out), "--classes", "teapot"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown synthetic class(es) ['teapot']" in r.stderr


def test_synthetic_masks_mark_exactly_the_changed_pixels(synthetic_root):
    assert set(CLASSES) == set(read_mvtec(synthetic_root))
    recs = read_mvtec(synthetic_root, ["pill"])["pill"]
    ds = load_records(recs.test, ["pill"], 64)
    normal = ds.images[ds.labels == 0].astype(int)
    for i in np.nonzero(ds.labels)[0]:
        m = ds.masks[i]
        assert 0 < m.mean() < 0.3, ds.defects[i]
        # outside the mask the defective image looks like a normal one (same render statistics)
        outside = ds.images[i][~m].astype(int).mean()
        assert abs(outside - normal.mean()) < 10


def test_validation_set_is_held_out_and_deterministic(synthetic_root):
    a = prepare_splits("mvtec", synthetic_root, ["brick", "washer"], image_size=32, val_fraction=0.25, seed=3)
    b = prepare_splits("mvtec", synthetic_root, ["brick", "washer"], image_size=32, val_fraction=0.25, seed=3)
    c = prepare_splits("mvtec", synthetic_root, ["brick", "washer"], image_size=32, val_fraction=0.25, seed=4)
    assert a.class_names == ["brick", "washer"]
    val_sources = {p.split("#")[0] for p in a.validation.paths}
    assert not val_sources & set(a.train.paths)                 # held out from training
    assert all("/train/good/" in p for p in val_sources)        # never from the test split
    assert len(a.train) + len(val_sources) == 48
    v = a.validation
    assert v.labels.sum() == len(v) // 2 and (v.masks[v.labels == 1].reshape(v.labels.sum(), -1).any(1)).all()
    assert not v.masks[v.labels == 0].any()
    assert np.array_equal(a.validation.images, b.validation.images)
    assert not np.array_equal(a.validation.images, c.validation.images)
    assert len(a.test) == 2 * (4 + 4 * 2)


def assert_same_datasets(a, b):
    for field in ("images", "masks", "labels", "class_indices"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and np.array_equal(x, y), field
    for field in ("class_names", "defects", "paths", "skipped"):
        assert getattr(a, field) == getattr(b, field), field


def decoding_forbidden(*args, **kwargs):
    raise AssertionError("decoded images although the cache holds them")


def test_splits_cache_returns_the_same_arrays_without_decoding(tmp_path, monkeypatch):
    root = tmp_path / "data"
    make_mvtec(root)
    save(root / "bottle/train/good/003.png", rgb(40, 50, 6))
    cache = tmp_path / "cache"
    kwargs = dict(image_size=16, val_fraction=0.5, seed=1, defects_per_normal=2)
    plain = prepare_splits("mvtec", root, **kwargs)
    first = prepare_splits("mvtec", root, cache_dir=cache, **kwargs)
    assert len(list(cache.glob("splits-*.npz"))) == 1
    monkeypatch.setattr("anomaly_data.splits.load_records", decoding_forbidden)
    second = prepare_splits("mvtec", root, cache_dir=cache, **kwargs)
    for split in ("train", "validation"):
        assert_same_datasets(getattr(plain, split), getattr(first, split))
        assert_same_datasets(getattr(plain, split), getattr(second, split))
    assert second.test_records == plain.test_records  # the test split is never cached
    with pytest.raises(AssertionError, match="decoded images"):  # other parameters: another entry
        prepare_splits("mvtec", root, cache_dir=cache, **{**kwargs, "image_size": 24})


def test_splits_cache_sees_a_changed_image_and_rebuilds_a_broken_entry(tmp_path, caplog):
    root = tmp_path / "data"
    make_mvtec(root)
    cache = tmp_path / "cache"
    before = prepare_splits("mvtec", root, image_size=16, cache_dir=cache)
    changed = root / "bottle/train/good/000.png"
    save(changed, rgb(40, 50, 99))
    after = prepare_splits("mvtec", root, image_size=16, cache_dir=cache)
    fresh = prepare_splits("mvtec", root, image_size=16)
    assert_same_datasets(after.train, fresh.train)
    assert_same_datasets(after.validation, fresh.validation)
    assert not (np.array_equal(before.train.images, after.train.images)
                and np.array_equal(before.validation.images, after.validation.images))
    entries = sorted(cache.glob("splits-*.npz"), key=lambda p: p.stat().st_mtime_ns)
    assert len(entries) == 2
    entries[-1].write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        again = prepare_splits("mvtec", root, image_size=16, cache_dir=cache)
    assert "rebuilding it" in caplog.text
    assert_same_datasets(again.train, fresh.train)


def prepare_in_subprocess(root, cache):
    return prepare_splits("mvtec", root, image_size=16, cache_dir=cache).train.images


def test_concurrent_processes_share_one_cache_entry(tmp_path):
    import multiprocessing as mp

    root = tmp_path / "data"
    make_mvtec(root)
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        results = pool.starmap(prepare_in_subprocess, [(root, cache)] * 2)
    assert np.array_equal(results[0], results[1])
    assert np.array_equal(results[0], prepare_splits("mvtec", root, image_size=16).train.images)
    assert len(list(cache.glob("splits-*.npz"))) == 1 and not list(cache.glob("*.tmp"))


def test_validation_needs_two_training_images(tmp_path):
    save(tmp_path / "one/train/good/0.png", rgb(8, 8))
    with pytest.raises(DatasetError, match="has 1 training image"):
        prepare_splits("mvtec", tmp_path, image_size=8)
    with pytest.raises(DatasetError, match="unknown dataset kind"):
        prepare_splits("coco", tmp_path)


def test_resize_mask_stays_binary():
    m = np.zeros((10, 10), bool)
    m[2:5, 2:5] = True
    r = resize_mask(m, (37, 23))
    assert r.dtype == bool and r.shape == (37, 23) and 0 < r.mean() < 0.2


def test_an_unusable_cache_folder_only_costs_the_cache(tmp_path, caplog):
    root = tmp_path / "data"
    make_mvtec(root)
    not_a_folder = tmp_path / "cache"
    not_a_folder.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING):
        splits = prepare_splits("mvtec", root, image_size=16, cache_dir=not_a_folder)
    assert "decoding without it" in caplog.text and str(not_a_folder) in caplog.text
    assert_same_datasets(splits.train, prepare_splits("mvtec", root, image_size=16).train)


def test_surfaces_family_masks_mark_every_visible_change(tmp_path):
    from anomaly_data import surfaces

    for kind, make in surfaces.DEFECTS.items():
        for c in surfaces.CLASSES:
            rng = np.random.default_rng([3, surfaces.CLASSES.index(c)])
            image = surfaces.render_normal(c, 96, rng)
            out, mask = make(image, rng)
            change = np.abs(out.astype(int) - image.astype(int)).max(axis=2)
            assert mask.any() and mask.mean() < 0.3, (kind, c)
            assert (change[mask] >= surfaces.MIN_DELTA).all() and (change[~mask] < surfaces.MIN_DELTA).all(), (kind, c)
    out = tmp_path / "surf"
    r = subprocess.run([sys.executable, "-m", "anomaly_data.synthetic", str(out), "--family", "surfaces",
                        "--image-size", "48", "--train", "3", "--test-good", "1", "--test-per-defect", "1"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    data = read_mvtec(out)
    assert set(data) == set(surfaces.CLASSES)
    assert {r.defect for r in data["weave"].test} == {"good", *surfaces.DEFECT_KINDS}
    assert json.loads((out / "synthetic.json").read_text())["family"] == "surfaces"
    r = subprocess.run([sys.executable, "-m", "anomaly_data.synthetic", str(out), "--family", "surfaces",
                        "--classes", "brick"], capture_output=True, text=True)
    assert r.returncode == 2 and "in family 'surfaces'" in r.stderr


# ---- checks before the run (anomaly_data.checks) ----

def png_bytes(h, w, seed=0):
    import io
    buf = io.BytesIO()
    Image.fromarray(rgb(h, w, seed)).save(buf, format="PNG")
    return buf.getvalue()


def test_check_masks_refuses_a_mask_of_the_wrong_size(tmp_path):
    from anomaly_data.checks import check_dataset, check_masks
    c = make_mvtec(tmp_path)
    assert check_masks(read_mvtec(tmp_path)["bottle"].test) == 1
    save(c / "ground_truth/crack/000_mask.png", np.zeros((20, 30), np.uint8))
    found = read_mvtec(tmp_path)
    with pytest.raises(DatasetError) as err:
        check_dataset(found)
    msg = str(err.value)
    assert f"mask {c / 'ground_truth/crack/000_mask.png'} is 30x20" in msg
    assert f"its image {c / 'test/crack/000.png'} is 50x40" in msg
    assert "1 ground-truth mask(s)" in msg and "resize each mask" in msg.lower()


def test_check_masks_missing_unreadable_and_many_offenders(tmp_path):
    from anomaly_data import ImageRecord
    from anomaly_data.checks import SHOWN, check_masks
    image = tmp_path / "img.png"
    save(image, rgb(10, 10))
    text = tmp_path / "text_mask.png"
    text.write_text("not a mask")
    gone = ImageRecord(image, "c", "test", 1, "hole", tmp_path / "gone_mask.png")
    with pytest.raises(DatasetError, match=r"mask .*gone_mask.png does not exist \(the mask of image .*img.png\)"):
        check_masks([gone])
    bad = [ImageRecord(image, "c", "test", 1, "hole", text)] * (SHOWN + 2)
    with pytest.raises(DatasetError) as err:
        check_masks(bad)
    msg = str(err.value)
    assert msg.startswith(f"{SHOWN + 2} ground-truth mask(s)") and "... and 2 more" in msg
    assert msg.count("cannot read mask") == SHOWN and "img.png" in msg


def test_verify_refuses_truncated_and_non_image_files_or_skips_them(tmp_path):
    from anomaly_data.checks import check_dataset
    c = make_mvtec(tmp_path)
    truncated, fake = c / "train/good/003.png", c / "train/good/004.png"
    data = png_bytes(40, 50, 7)
    truncated.write_bytes(data[: len(data) // 2])
    fake.write_text("this is not an image")
    found = read_mvtec(tmp_path)
    with pytest.raises(DatasetError) as err:
        check_dataset(found)
    msg = str(err.value)
    assert msg.startswith("2 image file(s) cannot be read")
    assert f"train image {truncated}" in msg and f"train image {fake}" in msg and "--skip-bad-images" in msg
    result = check_dataset(found, skip_bad=True)
    assert sorted(result.bad) == sorted([truncated, fake])
    assert result.checked == 7 and result.unchecked == []
    assert "2 unreadable training image(s) will be skipped" in result.summary()


def test_verify_never_skips_a_bad_test_image(tmp_path):
    from anomaly_data.checks import check_dataset
    c = make_mvtec(tmp_path)
    jpg = c / "test/good/001.jpg"
    Image.fromarray(rgb(40, 50, 8)).save(jpg, quality=95)
    data = jpg.read_bytes()
    jpg.write_bytes(data[: len(data) * 2 // 3])  # JPEG verify() alone would not see this
    with pytest.raises(DatasetError, match=r"(?s)test image .*001.jpg .*test images cannot be skipped"):
        check_dataset(read_mvtec(tmp_path), skip_bad=True)


def test_verify_every_training_image_bad_is_refused(tmp_path):
    from anomaly_data.checks import check_dataset
    c = make_mvtec(tmp_path)
    for p in (c / "train/good").iterdir():
        p.write_bytes(b"junk")
    with pytest.raises(DatasetError, match="every training image of class 'bottle' is unreadable"):
        check_dataset(read_mvtec(tmp_path), skip_bad=True)


def test_check_dataset_passes_a_clean_dataset(tmp_path):
    from anomaly_data.checks import check_dataset
    c = make_mvtec(tmp_path)
    Image.fromarray(rgb(40, 50, 9)).save(c / "train/good/003.jpg", quality=90)
    padded = c / "train/good/004.jpg"
    Image.fromarray(rgb(40, 50, 10)).save(padded, quality=90)
    padded.write_bytes(padded.read_bytes() + b"\x00" * 100 + b"trailer")  # loads fine: must pass
    found = read_mvtec(tmp_path)
    result = check_dataset(found)
    assert result.checked == 7 and result.bad == [] and result.unchecked == [] and result.seconds >= 0
    assert "checked 7 image(s)" in result.summary() and "not checked" not in result.summary()
    load_records(found["bottle"].train, ["bottle"], 16)  # what passed really loads


def test_verify_time_bound_stops_early(tmp_path, monkeypatch):
    from anomaly_data import checks
    make_mvtec(tmp_path)
    found = read_mvtec(tmp_path)
    recs = found["bottle"]
    result = checks.check_dataset(found, time_limit_s=0)
    assert result.checked == 0 and len(result.unchecked) == 5
    assert "5 image(s) not checked before the run" in result.summary()
    ticks = iter(range(100))
    monkeypatch.setattr(checks, "monotonic", lambda: float(next(ticks)))  # one second per call
    (recs.test[1].path).write_bytes(b"broken, but past the bound")
    result = checks.verify_images(recs.test + recs.train, time_limit_s=2.5)
    assert result.checked == 2  # training images first
    assert result.unchecked == [r.path for r in recs.train[2:] + recs.test]

"""Dataset layouts, crops and conversions, on synthetic files and (when present) the shared datasets."""
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model_zoo import data
from model_zoo.data import (FaceDataset, default_data_root, detect_layout, load_dataset, load_datasets,
                            save_folders, shared_dataset_dir, shared_datasets_root, to_model_input)


def shared(name: str) -> Path:
    root = shared_dataset_dir(name)
    if root is None:
        pytest.skip(f"shared dataset '{name}' absent under {shared_datasets_root()} (set FACEFED_DATA_ROOT)")
    return root


def _orl_like(root: Path, ids=(3, 4, 12), per_id=3) -> None:
    rng = np.random.default_rng(0)
    for i in ids:
        (root / f"s{i}").mkdir(parents=True)
        for k in range(1, per_id + 1):
            image = rng.integers(0, 256, (112, 92), dtype=np.uint8)
            image[:, 0], image[:, -1] = 10, 200  # edge columns, to check the letterbox padding
            cv2.imwrite(str(root / f"s{i}" / f"{k}.pgm"), image)


def test_detect_layout_variants(tmp_path):
    _orl_like(tmp_path / "orl")
    (tmp_path / "yale").mkdir()
    Image.fromarray(np.zeros((243, 320), np.uint8)).save(tmp_path / "yale" / "subject01.happy", format="GIF")
    (tmp_path / "folders" / "Ada").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "folders" / "Ada" / "0.jpg"), np.zeros((112, 112, 3), np.uint8))
    assert [detect_layout(tmp_path / n) for n in ("orl", "yale", "folders")] == ["orl", "yale", "folders"]
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="looked for ORL"):
        detect_layout(tmp_path / "empty")


def test_orl_letterbox_keeps_aspect_with_edge_padding(tmp_path):
    _orl_like(tmp_path)
    ds = load_dataset(tmp_path)
    assert ds.images.shape == (9, 112, 112, 3) and ds.images.dtype == np.uint8
    assert ds.identities == ["s3", "s4", "s12"]  # numeric, not lexicographic, order
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    original = cv2.imread(str(tmp_path / "s3" / "1.pgm"), cv2.IMREAD_GRAYSCALE)
    first = ds.images[0]
    assert np.array_equal(first[:, 10:102, 0], original)  # 92 wide -> 10 px each side, no stretching
    assert (first[:, :10, 0] == 10).all() and (first[:, 102:, 0] == 200).all()
    assert np.array_equal(first[..., 0], first[..., 2])  # grey replicated to 3 channels
    assert load_dataset(tmp_path, size=56).images.shape == (9, 56, 56, 3)


def test_yale_without_a_face_falls_back_to_centre_crop(tmp_path):
    frame = np.random.default_rng(1).integers(0, 256, (243, 320), dtype=np.uint8)
    Image.fromarray(frame).save(tmp_path / "subject02.sad", format="GIF")
    Image.fromarray(frame).save(tmp_path / "subject01.happy", format="GIF")
    ds = load_dataset(tmp_path)
    assert ds.identities == ["subject01", "subject02"]
    centre = cv2.resize(frame[:, 38:281], (112, 112), interpolation=cv2.INTER_AREA)
    assert np.array_equal(ds.images[0][..., 0], centre)


def test_folders_round_trip_through_save_folders(tmp_path):
    rng = np.random.default_rng(2)
    ds = FaceDataset(rng.integers(0, 256, (12, 112, 112, 3), dtype=np.uint8), np.arange(12) % 3,
                     ["Zoe", "Adam", "Mia"])
    save_folders(ds, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["Adam", "Mia", "Zoe"]
    back = load_dataset(tmp_path / "out")
    assert detect_layout(tmp_path / "out") == "folders" and back.identities == ["Adam", "Mia", "Zoe"]
    for name in ds.identities:  # PNG is lossless: same images per identity, in the same order
        assert np.array_equal(back.images[back.labels == back.identities.index(name)],
                              ds.images[ds.labels == ds.identities.index(name)])
    with pytest.raises(ValueError, match="folder name"):
        save_folders(FaceDataset(ds.images[:1], np.zeros(1), ["../evil"]), tmp_path / "bad")


def test_folders_accept_mixed_formats_and_sizes(tmp_path):
    (tmp_path / "Bo").mkdir()
    rgba = np.zeros((80, 60, 4), np.uint8)
    rgba[..., 2], rgba[..., 3] = 255, 128  # red in BGRA, half transparent
    cv2.imwrite(str(tmp_path / "Bo" / "a.png"), rgba)
    Image.fromarray(np.full((50, 50), 7, np.uint8)).save(tmp_path / "Bo" / "b.gif")
    (tmp_path / "Bo" / "notes.txt").write_text("not an image")
    ds = load_dataset(tmp_path)
    assert ds.images.shape == (2, 112, 112, 3)
    assert ds.images[0, 56, 56].tolist() == [255, 0, 0]  # RGB order, alpha dropped
    assert (ds.images[1] == 7).all()


def test_subset_reindexes_labels_densely():
    ds = FaceDataset(np.zeros((6, 4, 4, 3), np.uint8), np.array([0, 1, 2, 2, 1, 0]), ["a", "b", "c"])
    sub = ds.subset([2, 4, 3])
    assert sub.identities == ["b", "c"] and sub.labels.tolist() == [1, 0, 1] and len(sub) == 3
    with pytest.raises(ValueError):
        FaceDataset(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 5]), ["a"])


def test_load_datasets_prefixes_identities(tmp_path):
    _orl_like(tmp_path / "orl", ids=(3, 4))
    _orl_like(tmp_path / "more", ids=(3,))
    both = load_datasets([tmp_path / "orl", tmp_path / "more"])
    assert both.identities == ["orl_s3", "orl_s4", "more_s3"]
    assert np.bincount(both.labels).tolist() == [3, 3, 3]


def test_to_model_input_normalises_nchw():
    images = np.zeros((2, 112, 112, 3), np.uint8)
    images[1, :, :, 0] = 255
    x = to_model_input(images)
    assert x.shape == (2, 3, 112, 112) and x.dtype == torch.float32
    assert x[0].max().item() == pytest.approx(-127.5 / 128)
    assert x[1, 0].min().item() == pytest.approx(127.5 / 128) and x[1, 1].max().item() == pytest.approx(-127.5 / 128)


def test_default_data_root_search_order(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEFED_DATA", str(tmp_path / "explicit"))
    assert default_data_root() == tmp_path / "explicit"
    monkeypatch.delenv("FACEFED_DATA")
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "nowhere" / "repo")
    monkeypatch.chdir(tmp_path)
    assert default_data_root() is None
    (tmp_path / "ws" / "shared" / "datasets" / "orl").mkdir(parents=True)
    (tmp_path / "ws" / "main").mkdir()
    monkeypatch.chdir(tmp_path / "ws" / "main")
    assert default_data_root() == (tmp_path / "ws" / "shared" / "datasets" / "orl").resolve()


@pytest.mark.shared_data
def test_real_orl_loads_fast():
    root = shared("orl")
    start = time.perf_counter()
    ds = load_dataset(root)
    seconds = time.perf_counter() - start
    assert seconds < 3.0, f"ORL took {seconds:.2f} s"
    assert ds.images.shape == (380, 112, 112, 3) and len(ds.identities) == 38
    assert ds.identities[:2] == ["s3", "s4"] and ds.identities[-1] == "s40"
    assert np.bincount(ds.labels).tolist() == [10] * 38


@pytest.mark.shared_data
def test_real_yale_faces_are_found_and_cropped():
    root = shared("yale")
    ds = load_dataset(root)
    assert ds.images.shape == (164, 112, 112, 3) and ds.identities[0] == "subject01" and len(ds.identities) == 15
    frames = [data.read_gif(p) for p in sorted(root.glob("subject0[1-3].*"))]
    found = [data.face_box(f) is not None for f in frames]
    assert np.mean(found) > 0.9, f"Haar cascade found a face in only {sum(found)}/{len(found)} frames"


@pytest.mark.shared_data
def test_real_celeb_dev_is_a_folder_layout():
    root = shared("celeb-dev")
    assert detect_layout(root) == "folders"
    ds = load_dataset(root)
    assert len(ds.identities) == 12 and ds.images.shape[1:] == (112, 112, 3) and len(ds) > 5000
    assert not np.array_equal(ds.images[0][..., 0], ds.images[0][..., 1])  # colour kept


def test_first_per_identity_and_of_identities_pick_by_person():
    ds = FaceDataset(np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1).repeat(3, axis=3),
                     np.array([2, 0, 2, 1, 0, 2, 0]), ["a", "b", "c"])
    first = ds.first_per_identity(2)
    assert first.images[:, 0, 0, 0].tolist() == [1, 4, 3, 0, 2] and first.identities == ["a", "b", "c"]
    picked = ds.of_identities(["c", "a"])
    assert picked.images[:, 0, 0, 0].tolist() == [0, 1, 2, 4, 5, 6] and picked.identities == ["a", "c"]

"""Image folders, the digits export and partitioning (docs/design.md §9)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from collafuse.common.data import DataError, load_image_folder
from collafuse.evaluation.data.digits import digits_arrays, export_digits
from collafuse.evaluation.data.partition import partition, write_shards


def _write(path: Path, size: tuple[int, int] = (25, 25), mode: str = "RGB", value: int = 200) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 0)).save(path)


def test_class_folders_are_converted_to_the_served_spec(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "a.png")
    _write(tmp_path / "dog" / "b.jpg", (40, 30))
    data = load_image_folder(tmp_path, channels=1, size=16)
    assert data.images.shape == (2, 1, 16, 16)
    assert data.class_names == ["cat", "dog"] and data.paths == ["cat/a.png", "dog/b.jpg"]
    assert float(data.images.min()) >= -1 and float(data.images.max()) <= 1
    rgb = load_image_folder(tmp_path, channels=3, size=8)
    assert rgb.images.shape == (2, 3, 8, 8)


def test_flat_folder_with_labels_csv(tmp_path: Path) -> None:
    _write(tmp_path / "x.png", mode="L")
    _write(tmp_path / "y.png", mode="L")
    (tmp_path / "labels.csv").write_text("filename,label\nx.png,7\n")
    data = load_image_folder(tmp_path, 1, 8)
    assert data.class_names == ["7", "_unlabeled"]


def test_bad_folders_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 1, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "empty", 1, 16)
    broken = tmp_path / "broken" / "0" / "bad.png"
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        load_image_folder(tmp_path / "broken", 1, 16)


def test_digits_export_round_trips(tmp_path: Path) -> None:
    images, labels = digits_arrays(16)
    assert images.shape == (1797, 1, 16, 16) and sorted(set(labels.tolist())) == list(range(10))
    export_digits(tmp_path, 16)
    data = load_image_folder(tmp_path, 1, 16)
    assert len(data) == 1797
    first = data.paths.index("0/0000.png")
    assert np.abs(data.images[first].numpy() - images[0]).max() <= 1 / 127.5 + 1e-6


@pytest.mark.parametrize("scheme", ["iid", "classes", "dirichlet"])
def test_partitions_cover_every_image_once(scheme: str) -> None:
    labels = np.repeat(np.arange(10), 50)
    parts = partition(labels, 3, scheme, seed=1, alpha=1.0)  # type: ignore[arg-type]
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) and len(np.unique(joined)) == len(labels)
    if scheme == "classes":
        groups = [set(labels[p].tolist()) for p in parts]
        assert all(not (a & b) for i, a in enumerate(groups) for b in groups[i + 1 :])


def test_partition_errors() -> None:
    with pytest.raises(DataError, match="class group"):
        partition(np.arange(3), 5, "classes")
    with pytest.raises(DataError, match="unknown partition"):
        partition(np.arange(3), 1, "bogus")  # type: ignore[arg-type]


def test_write_shards(tmp_path: Path) -> None:
    for c in "ab":
        for i in range(4):
            _write(tmp_path / "src" / c / f"{i}.png", (8, 8), "L", 10 * i)
    shards = write_shards(tmp_path / "src", tmp_path / "out", 2, "classes")
    assert [sorted(p.name for p in s.iterdir()) for s in shards] == [["a"], ["b"]]

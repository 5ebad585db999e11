"""``collafuse-data`` on small files made here in the CIFAR-10 (python and binary) and CelebA layouts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from collafuse.common.data import DataError, load_image_folder, scan_image_folder
from collafuse.evaluation.data.celeba import read_celeba_attributes
from collafuse.evaluation.data.cifar import read_cifar10
from collafuse.evaluation.data.cli import main

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The 40 attribute columns of CelebA's list_attr_celeba.txt, in file order.
CELEBA_ATTRIBUTES = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs", "Big_Lips",
    "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows", "Chubby",
    "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones", "Male",
    "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose",
    "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair",
    "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young",
]


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any] | None, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def _cifar_batches(per_batch: int = 20, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random CIFAR-style batches (N, 3072) uint8 in R, G, B planes; image 0 of each batch is pure red."""
    rng = np.random.default_rng(seed)
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        data[0] = 0
        data[0, :1024] = 255
        labels = (np.arange(per_batch) + len(batches)) % 10
        batches[name] = (data, labels)
    return batches


def write_cifar_python(root: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    root.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        record = {b"batch_label": name.encode(), b"labels": labels.tolist(), b"data": data,
                  b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        (root / name).write_bytes(pickle.dumps(record, protocol=2))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": 20, b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_cifar_binary(root: Path, batches: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    root.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        records = np.concatenate([labels.astype(np.uint8)[:, None], data], axis=1)
        (root / f"{name}.bin").write_bytes(records.tobytes())
    (root / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    return root


def test_cifar10_python_and_binary_formats_give_the_same_client_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batches = _cifar_batches()
    python_src = write_cifar_python(tmp_path / "cifar-10-batches-py", batches)
    binary_src = write_cifar_binary(tmp_path / "bin" / "cifar-10-batches-bin", batches)
    from_pickle, from_binary = read_cifar10(python_src, "train"), read_cifar10(tmp_path / "bin", "train")
    assert from_pickle.images.shape == (100, 32, 32, 3) and from_pickle.class_names == CIFAR_NAMES
    assert np.array_equal(from_pickle.images, from_binary.images) and np.array_equal(from_pickle.labels, from_binary.labels)
    assert from_pickle.images[0, :, :, 0].min() == 255 and from_pickle.images[0, :, :, 1:].max() == 0  # planes -> RGB

    for src, out in ((python_src, tmp_path / "out-py"), (binary_src, tmp_path / "out-bin")):
        code, manifest, _ = _run(["cifar10", str(src), str(out), "--clients", "3", "--scheme", "classes"], capsys)
        assert code == 0 and manifest is not None
        clients = manifest["clients"]
        assert [c["name"] for c in clients] == ["client-0", "client-1", "client-2"]
        assert sum(c["images"] for c in clients) == 100
        assert set(clients[0]["classes"]) == {"airplane", "automobile", "bird", "cat"}
        assert json.loads((out / "manifest.json").read_text()) == manifest
        data = load_image_folder(out / "client-0", 3, 32)  # usable as collafuse-client --data
        assert data.images.shape[1:] == (3, 32, 32)
    files_py = sorted(p.relative_to(tmp_path / "out-py") for p in (tmp_path / "out-py").rglob("*.png"))
    files_bin = sorted(p.relative_to(tmp_path / "out-bin") for p in (tmp_path / "out-bin").rglob("*.png"))
    assert files_py == files_bin
    red = np.asarray(Image.open(tmp_path / "out-py" / "client-0" / "airplane" / "train1_00000.png"))
    assert red.shape == (32, 32, 3) and (red[..., 0] == 255).all() and (red[..., 1:] == 0).all()

    code, manifest, _ = _run(["cifar10", str(binary_src), str(tmp_path / "test-only"), "--clients", "2",
                              "--split", "test", "--per-class", "1"], capsys)
    assert code == 0 and manifest is not None and sum(c["images"] for c in manifest["clients"]) == 10


def test_cifar10_bad_files_are_plain_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(["cifar10", str(tmp_path / "nothing"), str(tmp_path / "out"), "--clients", "2"], capsys)
    assert code == 2 and "does not exist" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _run(["cifar10", str(tmp_path / "empty"), str(tmp_path / "out"), "--clients", "2"], capsys)
    assert code == 2 and "data_batch_1" in err

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "data_batch_1.bin").write_bytes(b"\x00" * 3000)
    code, _, err = _run(["cifar10", str(broken), str(tmp_path / "out"), "--clients", "2"], capsys)
    assert code == 2 and "3073" in err

    hostile = tmp_path / "hostile"
    hostile.mkdir()

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("this must never run",))

    (hostile / "data_batch_1").write_bytes(pickle.dumps({b"data": Payload()}))
    (hostile / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in CIFAR_NAMES]}))
    code, _, err = _run(["cifar10", str(hostile), str(tmp_path / "out"), "--clients", "2"], capsys)
    assert code == 2 and "refusing builtins.print" in err

    no_meta = write_cifar_python(tmp_path / "no-meta", _cifar_batches(4))
    (no_meta / "batches.meta").unlink()
    code, _, err = _run(["cifar10", str(no_meta), str(tmp_path / "out"), "--clients", "2"], capsys)
    assert code == 2 and "batches.meta" in err


def _write_celeba(root: Path, rows: list[dict[str, int]]) -> Path:
    images = root / "img_align_celeba"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = [str(len(rows)), " ".join(CELEBA_ATTRIBUTES) + " "]
    for i, attrs in enumerate(rows, start=1):
        name = f"{i:06d}.jpg"
        pixels = rng.integers(0, 256, size=(218, 178, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / name, quality=90)
        values = ["1" if attrs.get(a, -1) == 1 else "-1" for a in CELEBA_ATTRIBUTES]
        lines.append(f"{name} " + " ".join(f"{v:>2}" for v in values))
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    return root


CELEBA_ROWS = [
    {"Male": 1, "Smiling": 1},
    {"Male": 1},
    {"Male": 1, "Eyeglasses": 1},  # in two groups: left out under --assign exclusive
    {"Eyeglasses": 1, "Smiling": 1},
    {"Eyeglasses": 1},
    {"Young": 1, "Smiling": 1},
    {"Young": 1},
    {"Young": 1, "Male": 1},  # Male and not in ~Male,Young
    {},
]


def test_celeba_attribute_groups_become_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_celeba(tmp_path / "celeba", CELEBA_ROWS)
    attrs = read_celeba_attributes(src / "list_attr_celeba.txt")
    assert attrs.names == CELEBA_ATTRIBUTES and len(attrs.files) == 9 and attrs.values.shape == (9, 40)
    out = tmp_path / "out"
    code, manifest, _ = _run(["celeba", str(src), str(out), "--attributes", "Male", "Eyeglasses", "~Male,Young",
                              "--class-attribute", "Smiling", "--crop", "140", "--size", "32"], capsys)
    assert code == 0 and manifest is not None
    files = {p.parent.parent.name + "/" + p.parent.name + "/" + p.name for p in out.rglob("*.png")}
    assert files == {
        "client-0/Smiling/000001.png", "client-0/not_Smiling/000002.png", "client-0/not_Smiling/000008.png",
        "client-1/Smiling/000004.png", "client-1/not_Smiling/000005.png",
        "client-2/Smiling/000006.png", "client-2/not_Smiling/000007.png",
    }
    assert [g["kept"] for g in manifest["groups"]] == [3, 2, 2]
    assert Image.open(out / "client-0" / "Smiling" / "000001.png").size == (32, 32)
    assert load_image_folder(out / "client-1", 3, 32).class_names == ["Smiling", "not_Smiling"]

    code, manifest, _ = _run(["celeba", str(src), str(tmp_path / "first"), "--attributes", "Male", "Eyeglasses",
                              "--assign", "first", "--crop", "0", "--size", "0"], capsys)
    assert code == 0 and manifest is not None
    assert [c["images"] for c in manifest["clients"]] == [4, 2]
    assert Image.open(tmp_path / "first" / "client-1" / "all" / "000004.png").size == (178, 218)


def test_celeba_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _write_celeba(tmp_path / "celeba", CELEBA_ROWS)
    out = str(tmp_path / "out")
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Wizard"], capsys)
    assert code == 2 and "unknown CelebA attribute 'Wizard'" in err
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Bald"], capsys)
    assert code == 2 and "got no images" in err

    (src / "img_align_celeba" / "000002.jpg").unlink()
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Male"], capsys)
    assert code == 2 and "000002.jpg" in err and "--skip-missing" in err
    code, manifest, _ = _run(["celeba", str(src), out, "--attributes", "Male", "--skip-missing", "--size", "16"], capsys)
    assert code == 0 and manifest is not None and manifest["clients"][0]["images"] == 3

    attr_file = src / "list_attr_celeba.txt"
    lines = attr_file.read_text().splitlines()
    attr_file.write_text("\n".join(["12"] + lines[1:]) + "\n")
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Male", "--overwrite"], capsys)
    assert code == 2 and "line 1 says 12 images but 9 rows follow" in err
    attr_file.write_text("\n".join(["2", lines[1], lines[2], lines[3] + " 1"]) + "\n")
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Male", "--overwrite"], capsys)
    assert code == 2 and "line 4: 41 values for 40 attributes" in err
    attr_file.write_text("many\n" + "\n".join(lines[1:]))
    code, _, err = _run(["celeba", str(src), out, "--attributes", "Male", "--overwrite"], capsys)
    assert code == 2 and "expected the image count" in err
    code, _, err = _run(["celeba", str(tmp_path / "nowhere"), out, "--attributes", "Male"], capsys)
    assert code == 2 and "does not exist" in err


def test_digits_partition_and_folder_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, result, _ = _run(["digits", str(tmp_path / "digits"), "--size", "8"], capsys)
    assert code == 0 and result is not None and result["images"] == 1797 and len(result["classes"]) == 10

    code, manifest, _ = _run(["partition", str(tmp_path / "digits"), str(tmp_path / "iid"), "--clients", "4",
                              "--scheme", "dirichlet", "--alpha", "1.0", "--seed", "3"], capsys)
    assert code == 0 and manifest is not None and manifest["alpha"] == 1.0
    assert sum(c["images"] for c in manifest["clients"]) == 1797
    code, _, err = _run(["partition", str(tmp_path / "digits"), str(tmp_path / "iid"), "--clients", "2"], capsys)
    assert code == 2 and "--overwrite" in err
    code, manifest, _ = _run(["partition", str(tmp_path / "digits"), str(tmp_path / "iid"), "--clients", "2",
                              "--overwrite"], capsys)
    assert code == 0 and manifest is not None and len(manifest["clients"]) == 2
    assert not (tmp_path / "iid" / "client-3").exists()
    code, _, err = _run(["partition", str(tmp_path / "digits"), str(tmp_path / "digits" / "shards"), "--clients", "2"], capsys)
    assert code == 2 and "inside SRC" in err
    code, _, err = _run(["partition", str(tmp_path / "missing"), str(tmp_path / "x"), "--clients", "2"], capsys)
    assert code == 2 and "SRC" in err and "does not exist" in err
    code, _, err = _run(["partition", str(tmp_path / "digits"), str(tmp_path / "x"), "--clients", "11", "--scheme", "classes"], capsys)
    assert code == 2 and "class group" in err

    code, manifest, _ = _run(["folder", str(tmp_path / "digits"), str(tmp_path / "rgb"), "--clients", "2",
                              "--scheme", "classes", "--size", "12", "--channels", "3"], capsys)
    assert code == 0 and manifest is not None
    first = next((tmp_path / "rgb" / "client-1").rglob("*.png"))
    assert Image.open(first).size == (12, 12) and Image.open(first).mode == "RGB"
    assert {c for _, c in scan_image_folder(tmp_path / "rgb" / "client-1")} == {"5", "6", "7", "8", "9"}


def test_native_size_loading_and_mixed_sizes(tmp_path: Path) -> None:
    Image.new("L", (10, 6)).save(tmp_path / "a.png")
    assert load_image_folder(tmp_path, 1, None).images.shape == (1, 1, 6, 10)
    Image.new("L", (8, 8)).save(tmp_path / "b.png")
    with pytest.raises(DataError, match="different sizes"):
        load_image_folder(tmp_path, 1, None)
    assert load_image_folder(tmp_path, 3, 4).images.shape == (2, 3, 4, 4)


def test_photos_command_writes_colour_crops_of_the_two_sample_photographs(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["photos", str(tmp_path / "photos"), "--size", "16", "--per-class", "3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["classes"] == {"china": 3, "flower": 3} and summary["channels"] == 3
    image = np.asarray(Image.open(next((tmp_path / "photos" / "flower").iterdir())))
    assert image.shape == (16, 16, 3) and image.std() > 5  # a colour crop, not a blank
    assert main(["photos", str(tmp_path / "bad"), "--size", "4"]) != 0

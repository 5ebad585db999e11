"""``collafuse-eval``: one JSON object on stdout, exit 2 with one plain line on bad input, CLIP wiring."""

from __future__ import annotations

import importlib.machinery
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from collafuse.common.data import digits_arrays, save_png
from collafuse.common.metrics.cli import main
from collafuse.common.metrics.clip import ClipFeatures, clip_preprocess
from collafuse.common.metrics.errors import MetricsError
from collafuse.common.metrics.features import folder_features


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    images, labels = digits_arrays(16)
    for i in range(12):
        save_png(images[i], root / "real" / str(labels[i]) / f"{i}.png")
    rng = np.random.default_rng(0)
    for i in range(8):
        save_png(np.clip(rng.normal(0, 0.5, (1, 16, 16)), -1, 1), root / "fake" / f"{i}_{i % 10}.png")
    save_png(images[0], root / "single" / "0.png")
    (root / "empty").mkdir()
    return root


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, object] | None, str]:
    code = main(args + ["--no-progress"])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if captured.out.strip() else None), captured.err


def test_fid_prints_one_json_object_and_caches(folders: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = str(folders / "cache")
    args = ["fid", str(folders / "real"), str(folders / "fake"), "--cache-dir", cache, "--kid-subsets", "10"]
    code, result, _ = _run(args, capsys)
    assert code == 0 and result is not None
    assert result["n_real"] == 12 and result["n_fake"] == 8 and result["features"] == "inception"
    assert isinstance(result["fid"], float) and result["fid"] > 0
    assert set(result["kid"]) >= {"mean", "std"}  # type: ignore[arg-type]
    assert result["from_cache"] == {"real": False, "fake": False} and "floor" in str(result["note"])
    code, again, _ = _run(args, capsys)
    assert code == 0 and again is not None and again["from_cache"] == {"real": True, "fake": True}
    assert again["fid"] == result["fid"]
    code, floor, _ = _run(["floor", str(folders / "real"), "--n", "6", "--cache-dir", cache, "--repeats", "2"], capsys)
    assert code == 0 and floor is not None and floor["n"] == 6 and floor["n_real_total"] == 12 and floor["fid"] > 0  # type: ignore[operator]


@pytest.mark.parametrize("case,expected", [
    (["fid", "{root}/missing", "{root}/fake"], "does not exist"),
    (["fid", "{root}/real", "{root}/empty"], "holds no images"),
    (["fid", "{root}/real", "{root}/single"], "at least 2"),
    (["floor", "{root}/real", "--n", "7"], "need 14"),
])
def test_bad_input_exits_2_with_a_plain_message(folders: Path, case: list[str], expected: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    args = [a.format(root=folders) for a in case] + ["--cache-dir", str(folders / "cache")]
    code, result, err = _run(args, capsys)
    assert code == 2 and result is None and expected in err
    assert "Traceback" not in err


def test_clip_without_weights_says_what_to_pass(folders: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLLAFUSE_CLIP_WEIGHTS", raising=False)
    code, _, err = _run(["fid", str(folders / "real"), str(folders / "fake"), "--features", "clip"], capsys)
    assert code == 2 and "--clip-weights" in err and "transformers" in err and "open_clip" in err
    with pytest.raises(MetricsError, match="do not exist"):
        ClipFeatures(folders / "no-such-weights")


def test_entry_point_exits_2_on_a_missing_folder(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "collafuse-eval"
    assert script.exists(), "the collafuse-eval entry point is missing: run `make install`"
    proc = subprocess.run([str(script), "fid", str(tmp_path / "a"), str(tmp_path / "b")], capture_output=True, text=True, check=False,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "does not exist" in lines[0]


class _TinyVision(torch.nn.Module):
    """Stands in for transformers' CLIPVisionModelWithProjection: pixel_values -> .image_embeds."""

    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(projection_dim=8)
        self.proj = torch.nn.Linear(3, 8)

    def forward(self, pixel_values: torch.Tensor) -> types.SimpleNamespace:
        assert pixel_values.shape[1:] == (3, 224, 224)
        return types.SimpleNamespace(image_embeds=self.proj(pixel_values.mean(dim=(2, 3))))


def _fake_transformers(calls: list[tuple[str, bool]]) -> types.ModuleType:
    module = types.ModuleType("transformers")
    module.__spec__ = importlib.machinery.ModuleSpec("transformers", None)

    class CLIPVisionModelWithProjection:
        @staticmethod
        def from_pretrained(path: str, local_files_only: bool = False) -> torch.nn.Module:
            calls.append((path, local_files_only))
            return _TinyVision()

    module.CLIPVisionModelWithProjection = CLIPVisionModelWithProjection  # type: ignore[attr-defined]
    return module


def test_clip_features_from_a_local_transformers_folder(folders: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, bool]] = []
    monkeypatch.setitem(sys.modules, "transformers", _fake_transformers(calls))
    weights = tmp_path / "clip-vit-base-patch32"
    weights.mkdir()
    (weights / "config.json").write_text("{}")
    extractor = ClipFeatures(weights)
    assert calls == [(str(weights), True)] and extractor.num_features == 8
    features = folder_features(extractor, folders / "real", progress=False)
    assert features.features.shape == (12, 8)
    code, result, _ = _run(["fid", str(folders / "real"), str(folders / "fake"), "--features", "clip",
                            "--clip-weights", str(weights), "--no-cache"], capsys)
    assert code == 0 and result is not None and result["fcd"] == result["fid"] and result["feature_dim"] == 8


def test_clip_preprocessing_resizes_short_side_and_centre_crops() -> None:
    wide = torch.zeros(2, 1, 32, 64)
    out = clip_preprocess(wide)
    assert out.shape == (2, 3, 224, 224)
    # mid-grey (pixel 127.5 -> 128 after rounding) normalised per channel by CLIP's mean and std
    expected = (128 / 255 - 0.48145466) / 0.26862954
    assert float(out[0, 0, 100, 100]) == pytest.approx(expected, abs=1e-4)

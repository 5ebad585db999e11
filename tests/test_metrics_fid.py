"""FID with the standard Inception weights on real digits: checks that can fail (docs/design.md §10, issue 3).

Inception runs at about 3 images/s per CPU thread, so the sets here are small (64 images
each, 256 in all) and their features go to the feature cache (tests/conftest.py points it
at .cache/features), which makes reruns quick. FID on 64 images is biased upwards (about
55 for two real halves); the orderings and ratios below hold with a wide margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

from collafuse.common.data import save_png
from collafuse.evaluation.data.digits import digits_arrays
from collafuse.evaluation.metrics.distances import frechet_distance, kernel_inception_distance
from collafuse.evaluation.metrics.evaluate import source_features
from collafuse.evaluation.metrics.features import FeatureCache, folder_features, tensor_features
from collafuse.evaluation.metrics.inception import FID_FEATURES, InceptionFeatures, tf1_bilinear_resize

N = 64


@dataclass
class DigitFeatures:
    real_a: np.ndarray
    real_b: np.ndarray
    noise: np.ndarray
    shuffled: np.ndarray


@pytest.fixture(scope="module")
def extractor() -> InceptionFeatures:
    return InceptionFeatures()


@pytest.fixture(scope="module")
def digit_features(extractor: InceptionFeatures) -> DigitFeatures:
    images, _ = digits_arrays(16)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    real_a, real_b, to_shuffle = (images[order[k * N : (k + 1) * N]] for k in range(3))
    noise = np.clip(rng.normal(0.0, 0.5, size=real_a.shape), -1, 1).astype(np.float32)
    flat = to_shuffle.reshape(N, -1).copy()
    for row in flat:
        rng.shuffle(row)
    cache = FeatureCache()

    def features(array: np.ndarray, name: str) -> np.ndarray:
        return tensor_features(extractor, torch.from_numpy(array), cache=cache, progress=False, desc=name).features

    return DigitFeatures(features(real_a, "real a"), features(real_b, "real b"), features(noise, "noise"),
                         features(flat.reshape(to_shuffle.shape), "shuffled"))


def test_resize_is_tensorflow1_bilinear() -> None:
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    # TF1 resize_bilinear (align_corners=False): output pixel j samples input j * 2 / 4, edge-clamped.
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.0], [1.0, 1.5, 2.0, 2.0], [2.0, 2.5, 3.0, 3.0], [2.0, 2.5, 3.0, 3.0]])
    assert torch.allclose(tf1_bilinear_resize(image, (4, 4))[0, 0], expected)


def test_preprocessing_maps_grey_to_rgb_and_pixels_to_the_network_range(extractor: InceptionFeatures) -> None:
    grey = torch.linspace(-1, 1, 16 * 16).reshape(1, 1, 16, 16)
    net_input = extractor.preprocess(grey)
    assert net_input.shape == (1, 3, 299, 299)
    assert torch.equal(net_input[:, 0], net_input[:, 1]) and torch.equal(net_input[:, 1], net_input[:, 2])
    # black -> (0 - 128) / 128 = -1, white -> (255 - 128) / 128 = 0.9921875
    assert float(net_input.min()) == -1.0 and float(net_input.max()) == pytest.approx(127 / 128)
    same = extractor.preprocess(grey.expand(-1, 3, -1, -1))
    assert torch.equal(net_input, same)


def test_two_real_halves_are_close_and_noise_or_shuffled_pixels_are_far(digit_features: DigitFeatures) -> None:
    f = digit_features
    assert f.real_a.shape == (N, FID_FEATURES)
    real_real = frechet_distance(f.real_a, f.real_b)
    real_noise = frechet_distance(f.real_a, f.noise)
    real_shuffled = frechet_distance(f.real_a, f.shuffled)
    assert 0 < real_real < 100, real_real  # ~55 at 64 vs 64 (finite-sample bias)
    assert real_noise > 4 * real_real and real_shuffled > 4 * real_real, (real_real, real_noise, real_shuffled)
    assert real_noise > 250 and real_shuffled > 250


def test_kid_is_near_zero_for_one_distribution_and_large_otherwise(digit_features: DigitFeatures) -> None:
    f = digit_features
    same = kernel_inception_distance(f.real_a, f.real_b, subsets=50, subset_size=N)
    noise = kernel_inception_distance(f.real_a, f.noise, subsets=50, subset_size=N)
    shuffled = kernel_inception_distance(f.real_a, f.shuffled, subsets=50, subset_size=N)
    assert abs(same.mean) < 0.01, same
    assert noise.mean > 0.1 and shuffled.mean > 0.1 and noise.mean > 20 * abs(same.mean)


def test_torchmetrics_with_the_inception_module_as_its_extractor_gives_our_fid(extractor: InceptionFeatures) -> None:
    """The offline Inception module plugged into torchmetrics as ``feature=`` scores the images themselves;
    our route (cacheable features, then torchmetrics on them) must give the same number."""
    images, _ = digits_arrays(16)
    real, flipped = torch.from_numpy(images[:4]), torch.from_numpy(images[4:8]).flip(-1)
    metric = FrechetInceptionDistance(feature=extractor)
    metric.update(real, real=True)
    metric.update(flipped, real=False)
    reference = float(metric.compute())
    cache = FeatureCache()
    ours = frechet_distance(*(tensor_features(extractor, x, cache=cache, progress=False).features for x in (real, flipped)))
    assert ours == pytest.approx(reference, rel=1e-4), (ours, reference)


class _CountingExtractor:
    """A feature extractor that counts the images it is asked to embed."""

    name = "counting-test-extractor"
    num_features = 4

    def __init__(self) -> None:
        self.images_seen = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(images)
        return images.flatten(1)[:, : self.num_features] * 2 + 1


def test_cache_hit_returns_the_same_features_without_running_the_extractor(tmp_path: Path) -> None:
    images = torch.rand(6, 1, 12, 12) * 2 - 1
    cache = FeatureCache(tmp_path / "cache")
    extractor = _CountingExtractor()
    first = source_features(extractor, images, cache, batch_size=4, progress=False)
    assert not first.from_cache and extractor.images_seen == 6
    second = source_features(extractor, images, cache, batch_size=4, progress=False)
    assert second.from_cache and extractor.images_seen == 6, "a cache hit must not run the extractor"
    assert np.array_equal(first.features, second.features)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    other = source_features(extractor, images.flip(0), cache, progress=False)
    assert not other.from_cache and extractor.images_seen == 12
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2 and not np.array_equal(other.features, first.features)


def test_folder_features_match_tensor_features_and_cache_by_content(extractor: InceptionFeatures, tmp_path: Path) -> None:
    images = (torch.rand(5, 3, 20, 20) * 2 - 1).numpy()
    for i, image in enumerate(images):
        save_png(image, tmp_path / "imgs" / f"{i}.png")
    cache = FeatureCache(tmp_path / "cache")
    from_folder = folder_features(extractor, tmp_path / "imgs", cache=cache, progress=False)
    # PNGs hold 8-bit pixels; the extractor rounds tensors to 8 bits too, so both routes agree.
    from_tensor = tensor_features(extractor, torch.from_numpy(images), progress=False).features
    assert not from_folder.from_cache and np.allclose(from_folder.features, from_tensor, atol=1e-4)
    again = folder_features(extractor, tmp_path / "imgs", cache=cache, progress=False)
    assert again.from_cache and np.array_equal(again.features, from_folder.features)
    (tmp_path / "imgs" / "9.png").write_bytes((tmp_path / "imgs" / "0.png").read_bytes())
    grown = folder_features(extractor, tmp_path / "imgs", cache=cache, progress=False)
    assert not grown.from_cache and len(grown) == 6


def test_images_of_mixed_sizes_in_one_folder(extractor: InceptionFeatures, tmp_path: Path) -> None:
    save_png(np.zeros((1, 16, 16), np.float32), tmp_path / "a.png")
    save_png(np.zeros((3, 24, 20), np.float32), tmp_path / "b.png")
    result = folder_features(extractor, tmp_path, batch_size=8, progress=False)
    assert result.features.shape == (2, FID_FEATURES) and np.isfinite(result.features).all()


@pytest.mark.slow
def test_larger_sets_lower_the_floor(extractor: InceptionFeatures) -> None:
    """300 vs 300 real digits (NOTES: FID about 18) against 300 noise images; about 900 Inception passes."""
    images, _ = digits_arrays(16)
    order = np.random.default_rng(1).permutation(len(images))
    rng = np.random.default_rng(1)
    noise = np.clip(rng.normal(0.0, 0.5, size=(300, 1, 16, 16)), -1, 1).astype(np.float32)
    cache = FeatureCache()
    a, b, n = (tensor_features(extractor, torch.from_numpy(x), cache=cache, progress=False).features
               for x in (images[order[:300]], images[order[300:600]], noise))
    real_real = frechet_distance(a, b)
    assert real_real < 30 and frechet_distance(a, n) > 10 * real_real

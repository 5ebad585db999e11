"""The client's own noise floor and its data's native spec (issue 15, items 1 and 3): the numbers behind the
refusals that tests/test_hostile_server.py runs against a hostile server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from collafuse.client.ledger import FloorConfig, Ledger
from collafuse.client.local_data import data_look_gain
from collafuse.client.noise_floor import (
    NoiseFloorRefusal,
    check_schedule,
    client_floor,
    flag_value,
    per_element,
    per_native_pixel,
    reference_floor,
    release_floor,
)
from collafuse.common.data import save_png
from collafuse.common.image_spec import look_gain, native_shape, resize_gain
from collafuse.common.schedule import ScheduleConfig

STANDARD = ScheduleConfig()
AB200 = float(STANDARD.alphas_cumprod()[200])


def test_the_reference_floor_is_the_standard_schedule_at_the_cut():
    assert reference_floor(STANDARD, 200) == AB200 and abs(AB200 - 0.659) < 1e-3
    assert reference_floor(ScheduleConfig(num_train_timesteps=50), 200) == float(
        ScheduleConfig(num_train_timesteps=50).alphas_cumprod()[50])  # beyond its T: its last step


@pytest.mark.parametrize("gain", [1.0, 3.0, 16.0, 192.0])
@pytest.mark.parametrize("floor", [0.01, 0.659, 0.999])
def test_per_element_and_per_native_pixel_are_inverse(floor, gain):
    element = per_element(floor, gain)
    assert element <= floor and per_native_pixel(element, gain) == pytest.approx(floor, rel=1e-12)
    snr_element, snr_floor = element / (1 - element), floor / (1 - floor)
    assert gain * snr_element == pytest.approx(snr_floor)  # gain looks at the element floor = one at the floor


@pytest.mark.parametrize("alpha_bar", [0.659038, 0.99998806, 0.5, 1 - 1e-9, 1.0])
def test_the_named_flag_accepts_the_level_it_names(alpha_bar):
    value = float(flag_value(alpha_bar))
    assert alpha_bar <= value <= 1.0 and (1 - value) >= 0.99 * (1 - alpha_bar)


def test_look_gain_counts_replicated_channels_and_upsampled_pixels():
    assert look_gain((1, 16, 16), (1, 16, 16)) == 1.0
    assert look_gain((1, 16, 16), (3, 16, 16)) == 3.0
    assert look_gain((1, 16, 16), (1, 64, 64)) == pytest.approx(16.06, abs=0.05)  # about (64/16)^2
    assert look_gain((1, 16, 16), (3, 128, 128)) == pytest.approx(192.7, abs=0.5)
    assert look_gain((3, 40, 40), (3, 16, 16)) == 1.0  # shrinking never gives more than one look
    assert resize_gain(40, 16) < 1.0 and resize_gain(28, 32) == pytest.approx(1.144, abs=0.01)


def test_native_shapes_come_from_the_files(tmp_path):
    grey = np.random.default_rng(0).uniform(-1, 1, (1, 12, 10)).astype(np.float32)
    save_png(grey, tmp_path / "a" / "grey.png")
    save_png(np.repeat(grey, 3, axis=0), tmp_path / "a" / "grey_as_rgb.png")  # colour file, grey content
    save_png(np.random.default_rng(1).uniform(-1, 1, (3, 12, 10)).astype(np.float32), tmp_path / "b" / "rgb.png")
    assert native_shape(tmp_path / "a" / "grey.png") == (1, 12, 10)
    assert native_shape(tmp_path / "a" / "grey_as_rgb.png") == (1, 12, 10)
    assert native_shape(tmp_path / "b" / "rgb.png") == (3, 12, 10)
    look = data_look_gain(tmp_path, (3, 12, 12))
    assert look.native == (1, 12, 10) and look.images == 2 and look.gain == pytest.approx(3 * resize_gain(10, 12))
    assert data_look_gain(tmp_path, (1, 8, 8)).gain == 1.0


def test_the_floor_is_the_clients_own_and_only_tightens(tmp_path):
    with Ledger(tmp_path) as ledger:
        assert client_floor(ledger, 200).alpha_bar == AB200  # no server seen yet: the reference decides
        # A first schedule noisier than the reference is pinned, and tightens the floor from then on.
        noisy = ScheduleConfig(num_train_timesteps=500, beta_end=0.04)
        level = check_schedule(ledger, noisy, 200, "s1")
        assert level.alpha_bar < AB200 and client_floor(ledger, 200).alpha_bar == level.alpha_bar
        with pytest.raises(NoiseFloorRefusal, match="first accepted was T=500"):
            check_schedule(ledger, STANDARD, 200, "s1")
        # The user's word replaces it, in both directions; configured references move the floor with them.
        ledger.set_floor_config(FloorConfig(STANDARD, 0.7), "s1")
        assert check_schedule(ledger, STANDARD, 200, "s1").alpha_bar == AB200
        ledger.set_floor_config(FloorConfig(ScheduleConfig(num_train_timesteps=2000)), "s1")
        assert client_floor(ledger, 200).alpha_bar == level.alpha_bar  # the pinned level is tighter still
        assert [e["kind"] for e in ledger.events()].count("floor") == 2


def test_the_split_floor_per_element_includes_the_look_gain(tmp_path):
    images = torch.zeros((2, 3, 8, 8))  # grey carried in RGB: three looks per pixel
    with Ledger(tmp_path) as ledger:
        ledger.set_floor_config(FloorConfig(STANDARD, 0.9), "s")
        assert release_floor(ledger, STANDARD, 200, "s", images) == pytest.approx(
            per_element(0.9, 3.0))
        ledger.set_look_gain((1, 8, 8), 16.0, "s", "upsampled")
        assert release_floor(ledger, STANDARD, 600, "s", images[:, :1]) == pytest.approx(
            per_element(0.9, 16.0))
        with pytest.raises(NoiseFloorRefusal, match="up to 16 times.*use --cut 316 or more"):
            release_floor(ledger, STANDARD, 200, "s", images[:, :1])


def test_the_reference_settings_make_the_floor(tmp_path):
    from collafuse.client.noise_floor import floor_config
    from collafuse.common.config import ClientSettings
    from collafuse.common.settings import ConfigError

    own = ClientSettings(reference_timesteps=500, reference_beta_start=2e-4, reference_beta_end=0.03,
                         reference_beta_schedule="scaled_linear", max_release_alpha_bar=0.5)
    reference = ScheduleConfig(num_train_timesteps=500, beta_start=2e-4, beta_end=0.03, beta_schedule="scaled_linear")
    assert floor_config(own) == FloorConfig(reference, 0.5)
    assert floor_config(ClientSettings()) == FloorConfig(STANDARD, None)
    with pytest.raises(ConfigError, match="reference schedule is unusable.*raise beta_start"):
        floor_config(ClientSettings(reference_beta_start=1e-9, reference_beta_end=1e-9))
    with Ledger(tmp_path) as ledger:
        ledger.set_floor_config(floor_config(own.model_copy(update={"max_release_alpha_bar": None})), "s")
        assert client_floor(ledger, 200).alpha_bar == float(reference.alphas_cumprod()[200])

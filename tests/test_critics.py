"""Frozen critics: LPIPS loads offline (never downloads), the decoder unscales latents with the
VAE's own config and keeps the gradient through its checkpointing."""

import logging

import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny

from controlnet_emo.models.critics import (
    LatentDecoder,
    load_decoder,
    load_lpips,
    lpips_backbone_file,
)


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Any attempt to fetch a torchvision trunk fails the test; the torch cache is empty."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"download attempted: {args}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def _tiny_vae(**config) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
        **config,
    ).eval()


def _tiny_taesd_folder(path) -> str:
    """A random AutoencoderTiny with SD's 8x / 4-channel layout, saved like a hub folder."""
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1),
        num_decoder_blocks=(1, 1, 1, 1),
        latent_channels=4,
    ).save_pretrained(path)
    return str(path)


# --- LPIPS -----------------------------------------------------------------------------------


def test_random_lpips_warns_is_frozen_and_zero_on_identical_images(caplog):
    with caplog.at_level(logging.WARNING):
        model = load_lpips("alex", "random")
    assert "RANDOM trunk" in caplog.text
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(model(x, x).flatten(), torch.zeros(2))
    assert (model(x, x.flip(0)).flatten() > 0).all()


@pytest.mark.parametrize(
    "net,file", [("vgg", "vgg16-397923af.pth"), ("alex", "alexnet-owt-7be5be79.pth")]
)
def test_missing_pretrained_trunk_names_file_url_and_place(net, file, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load_lpips(net, "pretrained")
    message = str(err.value)
    assert file in message
    assert f"https://download.pytorch.org/models/{file}" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / file) in message


def test_trunk_loads_from_cache_and_from_path(tmp_path):
    from torchvision.models import alexnet

    torch.manual_seed(1)
    state = alexnet(weights=None).state_dict()
    cached = lpips_backbone_file("alex")
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    other = tmp_path / "my_alexnet.pth"
    torch.save(state, other)
    for spec in ("pretrained", str(other)):
        model = load_lpips("alex", spec)
        assert torch.equal(model.net.slice1[0].weight, state["features.0.weight"])
        assert torch.equal(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
        assert not any(p.requires_grad for p in model.parameters())


def test_wrong_trunk_file_is_refused(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not a torchvision"):
        load_lpips("alex", str(bad))
    with pytest.raises(FileNotFoundError, match="not a file"):
        load_lpips("alex", str(tmp_path / "missing.pth"))


# --- decoder ---------------------------------------------------------------------------------


def test_vae_decoder_unscales_with_its_own_factors():
    vae = _tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    decoder = load_decoder("vae", vae)
    assert decoder.autoencoder is vae and not decoder.decodes_reference
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        expected = vae.decode(z / 0.5 + 0.1).sample
        assert torch.allclose(decoder(z), expected, atol=1e-6)
    assert decoder(z).shape == (1, 3, 32, 32)


def test_vae_without_shift_factor():
    vae = _tiny_vae(scaling_factor=0.18215)
    decoder = LatentDecoder(vae, decodes_reference=False)
    assert decoder.scaling_factor == pytest.approx(0.18215) and decoder.shift_factor == 0.0


def test_checkpointed_decode_keeps_the_gradient():
    vae = _tiny_vae().requires_grad_(False)
    decoder = load_decoder("vae", vae)
    assert decoder.checkpointing == "blocks" and vae.decoder.gradient_checkpointing
    z = torch.randn(2, 4, 4, 4)
    grads = {}
    for mode in ("none", "blocks"):
        decoder.set_checkpointing(mode)
        assert vae.decoder.gradient_checkpointing == (mode == "blocks")
        zz = z.clone().requires_grad_(True)
        decoder(zz).square().mean().backward()
        grads[mode] = zz.grad
    assert grads["none"].abs().sum() > 0
    assert torch.allclose(grads["blocks"], grads["none"], atol=1e-6)
    with pytest.raises(ValueError, match="expected none or blocks"):
        decoder.set_checkpointing("sometimes")


def test_taesd_folder_decodes_frozen_and_decodes_its_reference(tmp_path):
    vae = _tiny_vae()
    decoder = load_decoder(_tiny_taesd_folder(tmp_path / "taesd"), vae)
    assert isinstance(decoder.autoencoder, AutoencoderTiny)
    assert decoder.decodes_reference and decoder.scaling_factor == 1.0
    assert not decoder.checkpoints_per_block  # TAESD's own checkpoint spans the decoder
    assert not any(p.requires_grad for p in decoder.parameters())
    z = torch.randn(2, 4, 4, 4, requires_grad=True)
    image = decoder(z)
    assert image.shape == (2, 3, 32, 32)
    image.sum().backward()
    assert z.grad.abs().sum() > 0


def test_taesd_with_wrong_latent_channels_is_refused(tmp_path):
    vae = _tiny_vae()
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4,
        num_encoder_blocks=(1,) * 4,
        num_decoder_blocks=(1,) * 4,
        latent_channels=16,
    ).save_pretrained(tmp_path / "t16")
    with pytest.raises(ValueError, match="16-channel"):
        load_decoder(str(tmp_path / "t16"), vae)


def test_missing_taesd_and_bad_path_are_clear(monkeypatch, tmp_path):
    """An empty Hugging Face cache, whatever this machine's holds: the error says what to
    fetch and how."""
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    vae = _tiny_vae()
    with pytest.raises(FileNotFoundError) as err:
        load_decoder("taesd", vae)
    assert "madebyollin/taesd" in str(err.value) and "huggingface-cli download" in str(err.value)
    with pytest.raises(FileNotFoundError, match="AutoencoderTiny folder"):
        load_decoder(str(tmp_path / "nowhere"), vae)

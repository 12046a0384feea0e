"""EmoNet: released layout, output-for-output agreement with the released network, loading
errors a user would hit, and the gradient path the emotion losses rely on."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from controlnet_emo.models.emonet import EXPRESSIONS, EmoNet, build_emonet, load_emonet

DATA = Path(__file__).parent / "data"
_spec = importlib.util.spec_from_file_location("emonet_weights", DATA / "emonet_weights.py")
emonet_weights = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emonet_weights)


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads((DATA / "emonet8_reference.json").read_text())


@pytest.fixture(scope="module")
def shared_state(reference) -> dict:
    return emonet_weights.deterministic_state_dict(reference["shapes"], salt="shared:")


@pytest.fixture(scope="module")
def small_model() -> EmoNet:
    with pytest.warns(UserWarning, match="random weights"):
        return build_emonet("random")


def _save(state: dict, path: Path, prefix: str = "module.") -> Path:
    torch.save({prefix + k: v for k, v in state.items()}, path)
    return path


def test_state_dict_matches_released_layout(reference, small_model):
    ours = {k: list(v.shape) for k, v in small_model.state_dict().items()}
    assert ours == reference["shapes"]  # key for key, shape for shape (682 entries)
    assert list(ours) == list(reference["shapes"])  # and in the released order
    n_params = sum(p.numel() for p in small_model.parameters())
    assert abs(n_params - 13.96e6) < 0.01e6
    assert EXPRESSIONS[:5] == ("neutral", "happy", "sad", "surprise", "fear")


def test_matches_released_network_output(tmp_path, reference, shared_state):
    model = load_emonet(_save(shared_state, tmp_path / "emonet_8.pth"))
    x = emonet_weights.reference_input(seed=1)  # (2, 3, 256, 256)
    with torch.no_grad():
        out = model(x)
    assert list(out["heatmap"].shape) == reference["heatmap_shape"]
    # The stored sample is the heatmap at every 16th row and column of each landmark map.
    got = {k: out[k] for k in ("expression", "valence", "arousal")}
    got["heatmap_sample_every_16"] = out["heatmap"][:, :, ::16, ::16].flatten()
    for key, value in got.items():
        ref = torch.tensor(reference[key], dtype=torch.float32)
        torch.testing.assert_close(value, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_load_freezes_and_evals(tmp_path, shared_state):
    model = load_emonet(_save(shared_state, tmp_path / "w.pth", prefix=""))  # no prefix too
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.n_expression == 8


def test_strict_load_rejects_wrong_keys(tmp_path, shared_state):
    missing = {k: v for k, v in shared_state.items() if k != "l1.bias"}
    with pytest.raises(ValueError, match=r"bad\.pth.*1 missing.*l1\.bias"):
        load_emonet(_save(missing, tmp_path / "bad.pth"))
    extra = {**shared_state, "bl1.weight": torch.zeros(256, 256, 1, 1)}
    with pytest.raises(ValueError, match=r"1 unexpected.*bl1\.weight"):
        load_emonet(_save(extra, tmp_path / "extra.pth"))
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    with pytest.raises(ValueError, match="tensor.pth"):
        load_emonet(tmp_path / "tensor.pth")


def test_missing_file_names_path_and_remedy(tmp_path):
    path = tmp_path / "nowhere" / "emonet_8.pth"
    with pytest.raises(FileNotFoundError) as err:
        load_emonet(path)
    message = str(err.value)
    assert str(path) in message and "model.emonet=" in message and "non-commercial" in message


def test_five_class_variant_roundtrip(tmp_path):
    with pytest.warns(UserWarning):
        model5 = build_emonet("random", n_expression=5)
    assert model5.emo_fc_2[3].weight.shape == (7, 128)
    loaded = load_emonet(_save(model5.state_dict(), tmp_path / "emonet_5.pth"))
    assert loaded.n_expression == 5


def test_valence_gradient_reaches_input_image(small_model):
    x = torch.rand(1, 3, 256, 256, requires_grad=True)
    small_model(x)["valence"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in small_model.parameters())


def test_other_sizes_are_resized_to_256(small_model):
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        out = small_model(x)
        direct = small_model(F.interpolate(x, size=(256, 256), mode="bilinear"))
    assert out["expression"].shape == (1, 8) and out["valence"].shape == (1,)
    assert out["heatmap"].shape == (1, 68, 64, 64)
    torch.testing.assert_close(out["valence"], direct["valence"])


def test_import_leaves_torch_nn_untouched():
    import torch.nn as nn
    from torch.nn.modules.instancenorm import InstanceNorm2d

    import controlnet_emo.models.emonet  # noqa: F401

    assert nn.InstanceNorm2d is InstanceNorm2d and nn.InstanceNorm2d is not nn.BatchNorm2d

"""One shared check over every model, after timm's tests: shapes, no NaN, every parameter learns."""

import pytest
import torch

from olr_ray.models import MODEL_REGISTRY, create_model, decoder_geometry, load_checkpoint, save_checkpoint

L, K = 5, 4


def _make(name: str, size: int):
    args = {"classifier": dict(num_labels=L, image_size=size, width=8),
            "siamese": dict(num_labels=L, k=K, image_size=size, width=8),
            "decoder": dict(num_labels=L, k=K, image_size=size, width=16, channels=8)}[name]
    model = create_model(name, **args)
    x = torch.randint(0, 256, (3, size, size, 3), dtype=torch.uint8) if name != "decoder" else torch.randn(3, L, K)
    return model, x


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_model_contract(name, size):
    torch.manual_seed(0)
    model, x = _make(name, size)
    out = model(x)
    expected = {"classifier": (3, L), "siamese": (3, L, K),
                "decoder": (3, 3, decoder_geometry(size)[2], decoder_geometry(size)[2])}[name]
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    # Same two-step interface everywhere.
    assert torch.allclose(model.forward_head(model.forward_features(x)), out)
    out.float().pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}: {pname} got no gradient"


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_checkpoint_round_trip_carries_constructor_args(name, tmp_path):
    model, x = _make(name, 32)
    model.eval()
    blob = save_checkpoint(model, name, extra={"epoch": 3})
    path = tmp_path / "m.pt"
    path.write_bytes(blob)
    again, state = load_checkpoint(str(path))
    assert state["epoch"] == 3 and type(again) is type(model)
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))


def test_siamese_blocks_are_nonnegative():
    model, x = _make("siamese", 32)
    assert (model(x) >= 0).all()


def test_decoder_geometry_follows_table_1_at_178():
    assert decoder_geometry(178) == (6, 5, 176)
    for size in (24, 32, 64, 96, 128, 218):
        s0, n_up, out = decoder_geometry(size)
        assert out <= size - 2 and 3 <= s0 <= 8

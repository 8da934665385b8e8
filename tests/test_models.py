"""One shared check over every model, after timm's tests: shapes, no NaN, every parameter learns."""

import numpy as np
import pytest
import torch

from olr_ray.models import (
    MODEL_REGISTRY,
    checkpoint_state,
    create_model,
    decoder_geometry,
    load_checkpoint,
    save_checkpoint,
)

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
    # What the driver reads for a stage's curves: the metadata, and no weights in memory.
    light = checkpoint_state(str(path))
    assert light["epoch"] == 3 and light["model_name"] == name
    assert all(t.device.type == "meta" for t in light["state_dict"].values())


@pytest.mark.parametrize("activation", ["relu", "abs", "relu_leaky_grad"])
def test_siamese_blocks_are_nonnegative(activation):
    model = create_model("siamese", num_labels=L, k=K, image_size=32, width=8, activation=activation)
    assert (model(torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)) >= 0).all()


def test_abs_and_leaky_grad_blocks_cannot_die_where_relu_blocks_do():
    """A label layer pushed negative everywhere: ReLU blocks are zero with no gradient; abs and
    relu_leaky_grad blocks still learn, and relu_leaky_grad blocks are exactly zero like ReLU's."""
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    grads = {}
    for activation in ("relu", "abs", "relu_leaky_grad"):
        torch.manual_seed(0)
        model = create_model("siamese", num_labels=L, k=K, image_size=32, width=8, activation=activation)
        with torch.no_grad():
            model.label_layer.weight.copy_(-model.label_layer.weight.abs())  # trunk output is >= 0 (ReLU)
        e = model(x)
        e.sum().backward()
        grads[activation] = model.label_layer.weight.grad.abs().sum().item()
        if activation != "abs":
            assert (e == 0).all()
    assert grads["relu"] == 0 and grads["abs"] > 0 and grads["relu_leaky_grad"] > 0


def test_block_floor_keeps_the_pair_loss_alive_where_both_blocks_are_zero():
    """Two images whose blocks are all zero: <E1, E2> has zero gradient, whatever the activation's
    own gradient; a floor on every coordinate lets the loss lift them again."""
    from olr_ray.models.nets import pair_dots

    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    grads = {}
    for floor in (0.0, 0.01):
        torch.manual_seed(0)
        model = create_model("siamese", num_labels=L, k=K, image_size=32, width=8,
                             activation="relu_leaky_grad", floor=floor)
        with torch.no_grad():
            model.label_layer.weight.copy_(-model.label_layer.weight.abs())
        e = model(x)
        assert torch.allclose(e, torch.full_like(e, floor))
        loss = (pair_dots(e[:2], e[2:]) - 0.5).pow(2).mean()  # targets well above the dots
        loss.backward()
        grads[floor] = model.label_layer.weight.grad.abs().sum().item()
    assert grads[0.0] == 0 and grads[0.01] > 0


def test_siamese_trunk_starts_from_the_classifier(tmp_path):
    from olr_ray.train.tasks import SiameseTask

    clf = create_model("classifier", num_labels=L, image_size=32, width=8)
    (tmp_path / "clf.pt").write_bytes(save_checkpoint(clf, "classifier"))
    task = SiameseTask(name="siamese", model_name="siamese", label_names=list("abcde"), epochs=1, batch_size=2,
                       lr=1e-3, model_args=dict(num_labels=L, k=K, image_size=32, width=8),
                       init_trunk_from=str(tmp_path / "clf.pt"))
    model = task.build_model()
    for a, b in zip(model.trunk.state_dict().values(), clf.trunk.state_dict().values()):
        assert torch.equal(a, b)
    # Another width: the trunk cannot be copied, and the Siamese starts fresh instead of failing.
    task.model_args = dict(num_labels=L, k=K, image_size=32, width=16)
    assert task.build_model().trunk[0].weight.shape[0] == 16


def test_grad_floor_keeps_the_loss_value_and_lifts_blocks_stuck_at_zero():
    from olr_ray.models.nets import pair_dots

    e1, e2 = torch.rand(4, L, K, requires_grad=True), torch.rand(4, L, K, requires_grad=True)
    assert torch.equal(pair_dots(e1, e2, 0.05), pair_dots(e1, e2))
    # Both blocks exactly zero and a target above the dot product: no gradient without the floor,
    # with it a step that raises both blocks.
    grads = {}
    for g in (0.0, 0.05):
        z1, z2 = torch.zeros(2, L, K, requires_grad=True), torch.zeros(2, L, K, requires_grad=True)
        (pair_dots(z1, z2, g) - 0.5).pow(2).sum().backward()
        grads[g] = (z1.grad, z2.grad)
    assert grads[0.0][0].abs().sum() == 0 and grads[0.0][1].abs().sum() == 0
    assert torch.allclose(grads[0.05][0], torch.full_like(z1, 2 * -0.5 * 0.05))
    assert torch.allclose(grads[0.05][1], grads[0.05][0])


def test_siamese_task_with_grad_floor_revives_an_all_zero_label_layer():
    from olr_ray.train.tasks import SiameseTask

    torch.manual_seed(0)
    batch = {"image_a": torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8),
             "image_b": torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8),
             "target": torch.full((3, L), 0.5)}
    grads = {}
    for g in (0.0, 0.05):
        task = SiameseTask(name="siamese", model_name="siamese", label_names=list("abcde"), epochs=1, batch_size=2,
                           lr=1e-3, model_args=dict(num_labels=L, k=K, image_size=32, width=8,
                                                    activation="relu_leaky_grad"), grad_floor=g)
        model = task.build_model()
        torch.nn.init.zeros_(model.label_layer.weight)  # every block exactly zero: the paper's loss is stuck
        task.loss(model, batch).backward()
        grads[g] = model.label_layer.weight.grad.abs().sum().item()
    assert grads[0.0] == 0 and grads[0.05] > 0


def test_decoder_geometry_follows_table_1_at_178():
    assert decoder_geometry(178) == (6, 5, 176)
    for size in (24, 32, 64, 96, 128, 218):
        s0, n_up, out = decoder_geometry(size)
        assert out <= size - 2 and 3 <= s0 <= 8


def test_decoder_label_term_trains_the_decoder_through_a_frozen_classifier(tmp_path):
    from olr_ray.train.tasks import DecoderTask

    torch.manual_seed(0)
    clf = create_model("classifier", num_labels=L, image_size=32, width=8).eval()
    (tmp_path / "clf.pt").write_bytes(save_checkpoint(clf, "classifier"))
    args = dict(name="decoder", model_name="decoder", label_names=list("abcde"), epochs=1, batch_size=4, lr=1e-3,
                model_args=dict(num_labels=L, k=K, image_size=32, width=16, channels=8),
                classifier_uri=str(tmp_path / "clf.pt"))
    batch = {"embedding": torch.randn(4, L, K), "image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8),
             "labels": torch.randint(0, 2, (4, L), dtype=torch.int8)}
    plain, with_labels = DecoderTask(**args), DecoderTask(**args, label_weight=2.0)
    model = plain.build_model()
    base = plain.loss(model, batch)
    total = with_labels.loss(model, batch)
    # The added term is exactly label_weight * BCE(classifier(decoded face), labels).
    logits = with_labels.label_logits(model.reconstruct(batch["embedding"]), 32)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["labels"].float())
    assert float((total - base).detach()) == pytest.approx(2.0 * float(bce.detach()), rel=1e-5)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    frozen = with_labels._frozen(with_labels.classifier_uri, "cpu")
    assert not frozen.training and all(p.grad is None and not p.requires_grad for p in frozen.parameters())


def _edit_task(tmp_path, **kw):
    from olr_ray.train.tasks import DecoderTask

    sia = create_model("siamese", num_labels=L, k=K, image_size=32, width=8).eval()
    (tmp_path / "sia.pt").write_bytes(save_checkpoint(sia, "siamese"))
    mean = (np.arange(L * K, dtype=np.float32).reshape(L, K) + 1) / 100
    return DecoderTask(name="decoder", model_name="decoder", label_names=list("abcde"), epochs=1, batch_size=4,
                       lr=1e-3, model_args=dict(num_labels=L, k=K, image_size=32, width=16, channels=8),
                       siamese_uri=str(tmp_path / "sia.pt"), edit_mean=mean,
                       edit_chol=np.zeros((L, K, K), np.float32), **kw)


def test_random_edits_change_one_block_per_row_to_a_sample_or_zero(tmp_path):
    task = _edit_task(tmp_path)
    torch.manual_seed(0)
    E = torch.rand(400, L, K) + 1.0  # no block is zero or equal to a mean before the edit
    edited = task.random_edits(E)
    changed = (edited != E).any(-1)  # (N, L)
    assert changed.sum(1).eq(1).all()
    rows, labels = changed.nonzero(as_tuple=True)
    blocks = edited[rows, labels]
    zero = blocks.eq(0).all(-1)
    # With a zero covariance, an added block is exactly its label's mean.
    sampled = torch.isclose(blocks, torch.from_numpy(task.edit_mean)[labels]).all(-1)
    assert (zero ^ sampled).all()
    assert 0.4 < float(zero.float().mean()) < 0.6  # half added, half removed
    assert len(set(labels.tolist())) == L


def test_decoder_edit_term_is_siamese_reembedding_mse_and_trains_only_the_decoder(tmp_path):
    plain, with_edits = _edit_task(tmp_path), _edit_task(tmp_path, edit_weight=3.0)
    torch.manual_seed(1)
    model = plain.build_model()
    batch = {"embedding": torch.rand(4, L, K), "image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)}
    base = plain.loss(model, batch)
    torch.manual_seed(2)
    total = with_edits.loss(model, batch)
    torch.manual_seed(2)
    edited = with_edits.random_edits(batch["embedding"])  # the same edits the loss drew
    sia = with_edits._frozen(with_edits.siamese_uri, "cpu")
    expected = torch.nn.functional.mse_loss(sia(with_edits.as_input(model.reconstruct(edited), 32)), edited)
    assert float((total - base).detach()) == pytest.approx(3.0 * float(expected.detach()), rel=1e-4)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not sia.training and all(p.grad is None and not p.requires_grad for p in sia.parameters())


def test_decoder_edit_warmup_ramps_the_edit_term_over_its_epochs_and_survives_a_resume(tmp_path):
    # 2 workers of 4 rows over 40 rows: 5 steps an epoch; a 2-epoch warm-up reaches the full weight at step 10.
    task = _edit_task(tmp_path, edit_weight=3.0, edit_warmup=2.0, train_rows=40)
    shares = []
    for epoch in range(3):
        task.begin_epoch(epoch, world=2)
        shares += [task.edit_ramp() for _ in range(5)]
    assert shares[:10] == pytest.approx([i / 10 for i in range(1, 11)]) and shares[10:] == [1.0] * 5
    resumed = _edit_task(tmp_path, edit_weight=3.0, edit_warmup=2.0, train_rows=40)
    resumed.begin_epoch(1, world=2)  # a worker restarted from epoch 1's checkpoint picks up the ramp there
    assert resumed.edit_ramp() == pytest.approx(0.6)
    # The share scales the edit term of the training loss; 0 warm-up epochs give the full weight at once.
    model, batch = task.build_model(), {"embedding": torch.rand(4, L, K),
                                        "image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)}
    losses = []
    for share in (0.0, 0.5, 1.0):
        torch.manual_seed(5)
        losses.append(float(task._losses(model, batch, edit_share=share)[0].detach()))
    assert losses[0] < losses[1] < losses[2] and losses[2] - losses[1] == pytest.approx(losses[1] - losses[0], rel=1e-3)
    plain = _edit_task(tmp_path, edit_weight=3.0, train_rows=40)
    plain.begin_epoch(0, world=2)
    assert plain.edit_ramp() == 1.0


def test_decoder_validation_draws_the_same_edits_every_epoch(tmp_path):
    # val_loss carries the edit term; with fresh random edits at each validation it would move between
    # epochs even for an unchanged model, and the curve could not be read.
    task = _edit_task(tmp_path, edit_weight=3.0)
    torch.manual_seed(3)
    model = task.build_model().eval()
    batch = {"embedding": torch.rand(8, L, K), "image": torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)}
    task.eval_batches = lambda name, device: iter([batch])
    first = task.validate(model, torch.device("cpu"), final=False)
    torch.manual_seed(4)  # the global RNG moves on between epochs; the validation edits must not
    again = task.validate(model, torch.device("cpu"), final=False)
    assert again["val_loss"] == first["val_loss"]
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(task.random_edits(batch["embedding"], gen()), task.random_edits(batch["embedding"], gen()))


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_bf16_models_return_float32_close_to_fp32_and_learn(name):
    """precision=bf16 runs the layers in bfloat16; what leaves the model (losses' input, embeddings) is float32."""
    from olr_ray.models.precision import set_precision

    torch.manual_seed(0)
    model, x = _make(name, 32)
    model.eval()
    with torch.inference_mode():
        ref = model(x)
        low = set_precision(model, "bf16")(x)
    assert low.dtype == torch.float32 and ref.dtype == torch.float32
    assert not torch.equal(low, ref), "bf16 changed nothing: autocast did not run"
    assert float((low - ref).abs().max()) <= 0.05 * float(ref.abs().max())
    model.train()
    model(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_precision_auto_follows_the_hardware_and_bad_values_are_named():
    from olr_ray.models.precision import bf16_native, resolve_precision, set_precision

    assert resolve_precision("auto", "cpu") == ("bf16" if bf16_native("cpu") else "fp32")
    assert resolve_precision("fp32", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="resolved precision"):
        set_precision(_make("classifier", 32)[0], "auto")


@pytest.mark.parametrize("name", ["classifier", "siamese"])
def test_batchnorm_folded_for_inference_gives_the_same_outputs(name):
    from olr_ray.models.inference import for_inference

    torch.manual_seed(0)
    model, x = _make(name, 32)
    model.train()
    model(x)  # running statistics away from their initial 0/1
    model.eval()
    with torch.inference_mode():
        ref = model(x)
        fused = for_inference(model)
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="eval mode"):
        _make(name, 32)[0].train().trunk.fuse_batchnorm()

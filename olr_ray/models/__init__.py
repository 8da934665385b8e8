"""Models of the OLR method, built by :func:`create_model` and saved with their constructor args.

Every model exposes the same two-step interface, after timm:
``forward_features(x)`` gives the trunk's feature map and ``forward_head(features)`` the
model's output, so the embedding job, the probe and the decoder never special-case a model.
"""

from olr_ray.models.nets import (
    MODEL_REGISTRY,
    Classifier,
    Decoder,
    SiameseEmbedder,
    checkpoint_state,
    create_model,
    decoder_geometry,
    load_checkpoint,
    save_checkpoint,
)

__all__ = [
    "MODEL_REGISTRY",
    "Classifier",
    "Decoder",
    "SiameseEmbedder",
    "checkpoint_state",
    "create_model",
    "decoder_geometry",
    "load_checkpoint",
    "save_checkpoint",
]

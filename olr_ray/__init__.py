"""olr_ray: Occlusion-based Latent Representations (OLR) on Ray.

Turns the binary labels of a multi-label image dataset into per-label embeddings
(L x k per image), trains with Ray Train and serves the embeddings as Parquet.
"""

__version__ = "0.1.0"

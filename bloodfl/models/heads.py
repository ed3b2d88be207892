"""The papers' classification head: Flatten -> Dense(hidden) -> ReLU -> Dropout -> Linear(num_classes)."""

from __future__ import annotations

import torch
from torch import nn


class PaperHead(nn.Module):
    """Head on a backbone's feature map.

    pool="flatten" keeps the spatial layout (papers/000: Flatten -> Dense 1024); pool="avg" global-average
    pools first, which keeps the head small at large image sizes. hidden=0 drops the hidden layer.
    Token outputs (B, N, C) of vision transformers are flattened, or averaged over tokens.
    batchnorm=True adds BatchNorm after the hidden layer's ReLU (papers/004's Xception and ResNet50 heads,
    section 3.3.1: "dense layers with ReLU activation, batch normalization, dropout").
    Outputs logits; softmax is applied at inference (``predict_proba``) and inside the loss.
    """

    def __init__(self, in_shape: tuple[int, ...], num_classes: int, pool: str = "flatten",
                 hidden: int = 1024, dropout: float = 0.5, batchnorm: bool = False) -> None:
        super().__init__()
        if pool not in ("flatten", "avg"):
            raise ValueError(f"head.pool must be 'flatten' or 'avg', got {pool!r}")
        self.pool = pool
        if pool == "flatten":
            in_features = 1
            for d in in_shape:
                in_features *= d
        else:
            in_features = in_shape[0] if len(in_shape) == 3 else in_shape[-1]
        layers: list[nn.Module] = []
        if hidden > 0:
            # ReLU must not be in-place: Opacus' backward hooks reject in-place ops on hooked outputs
            layers += [nn.Linear(in_features, hidden), nn.ReLU(), *([nn.BatchNorm1d(hidden)] if batchnorm else []),
                       nn.Dropout(dropout)]
            in_features = hidden
        layers.append(nn.Linear(in_features, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pool == "avg":
            features = features.mean(dim=(2, 3)) if features.dim() == 4 else features.mean(dim=1)
        return self.mlp(features.flatten(1))

"""The plain CNNs the papers propose, written here (the papers give no code).

Page/section references point into the text copies in shared/papers (``NNN_*.txt``; line numbers of that text).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from bloodfl.models.registry import register_model


class _Features(nn.Module):
    """Backbone base: ``forward_features`` runs ``self.features`` (timm's interface, for the paper head)."""

    features: nn.Sequential

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@register_model("paper002_cnn")
class Paper002CNN(_Features):
    """papers/002 (Deng et al.), the plain "CNNs" model: section 3.2 (Experiments, text line 182) describes it only
    as a "traditional CNN with four hidden layers", trained with Adam (lr 1e-4, 20 epochs) on 4 classes;
    section 2.1 (eqs. 3-5) gives its operations: 3x3 convolutions with 'same' padding and ReLU.

    So: four hidden blocks Conv3x3('same') -> ReLU -> MaxPool 2x2, each halving the map. The paper gives no
    widths; ours double from 32 (32-64-128-256). Output (B, 256, H/16, W/16); the paper head goes on top.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (32, 64, 128, 256)) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.num_features = chans[-1]


@register_model("paper003_cnn")
class Paper003CNN(_Features):
    """papers/003 (Asghar et al.), the proposed CNN: section "Proposed CNN model" (text lines 102-131, Figure 3).

    Seven convolution blocks, each Conv 3x3 (stride 1, 'same' padding) -> ReLU -> MaxPool 2x2 with stride 1
    (Keras 'valid' padding: each pool trims one pixel) -> Dropout 0.25; filters 32, 64, 64, 64, 128, 256, 256;
    input 100x100x3, so the last map is 256 x 93 x 93. The paper then has a Dense 128 (ReLU) and the softmax
    output (its "five fully connected hidden layers" lists only the one); that is the model's head config.
    """

    def __init__(self, in_chans: int = 3, widths: Sequence[int] = (32, 64, 64, 64, 128, 256, 256),
                 dropout: float = 0.25) -> None:
        super().__init__()
        chans = (in_chans, *widths)
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2, stride=1),
                       nn.Dropout(dropout)]
        self.features = nn.Sequential(*layers)
        self.num_features = chans[-1]

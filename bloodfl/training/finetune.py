"""Fine-tuning schemes (``finetune=full|frozen|two_phase``) as a Lightning callback on the backbone.

``frozen`` trains only the head; ``two_phase`` (papers/004, section 3.3.1 "Xception" and 3.3.4 "ResNet50": "first,
only the custom classification layers were trained, while the base remained frozen. In the second phase, the
final 20 layers were unfrozen for fine-tuning with a little learning rate") trains the head with the backbone
frozen for ``unfreeze_at_epoch`` epochs, then unfreezes the backbone's last ``unfreeze_last`` layers at
``lr_ratio`` times the learning rate. ``full`` needs no callback.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from bloodfl.errors import BloodflError


def backbone_of(pl_module: nn.Module) -> nn.Module:
    """The classifier's backbone: ``pl_module.net.backbone`` (bloodfl's module) or ``pl_module.backbone``."""
    for owner in (getattr(pl_module, "net", None), pl_module):
        backbone = getattr(owner, "backbone", None)
        if isinstance(backbone, nn.Module):
            return backbone
    raise BloodflError("finetune: the model has no .backbone to freeze")


def last_layers(backbone: nn.Module, k: int | None) -> list[nn.Module]:
    """The backbone's last ``k`` layers as Keras counts them (``base.layers[-k:]``): modules holding weights of
    their own (convolutions, normalisations, linear layers), in definition order; ``None``: the whole backbone."""
    if k is None:
        return [backbone]
    layers = [m for m in backbone.modules() if any(True for _ in m.parameters(recurse=False))]
    return layers[-k:] if k > 0 else []


class BackboneFinetune(BaseFinetuning):
    """Freeze the backbone before training; at epoch ``unfreeze_at_epoch`` (None: never, i.e. ``frozen``)
    unfreeze its last ``unfreeze_last`` layers (None: all of it) into a new optimizer parameter group whose
    learning rate is the optimizer's (first group) times ``lr_ratio``.

    ``train_bn=False`` keeps frozen BatchNorm layers in inference mode (running statistics not updated), as
    Keras does for layers with ``trainable=False``. Built from ``conf/finetune/*.yaml`` by its ``_target_``.
    """

    def __init__(self, unfreeze_at_epoch: int | None = None, unfreeze_last: int | None = None,
                 lr_ratio: float = 0.1, train_bn: bool = False) -> None:
        super().__init__()
        if unfreeze_at_epoch is not None and unfreeze_at_epoch < 0:
            raise BloodflError(f"finetune.unfreeze_at_epoch must be >= 0 or null, got {unfreeze_at_epoch}")
        if not 0 < lr_ratio <= 1:
            raise BloodflError(f"finetune.lr_ratio must be in (0, 1], got {lr_ratio}")
        self.unfreeze_at_epoch = unfreeze_at_epoch
        self.unfreeze_last = unfreeze_last
        self.lr_ratio = lr_ratio
        self.train_bn = train_bn

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "privacy", None) is not None:
            raise BloodflError("finetune=frozen/two_phase is not supported with dp=true yet; use finetune=full")
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: pl.LightningModule) -> None:
        self.freeze(backbone_of(pl_module), train_bn=self.train_bn)

    def finetune_function(self, pl_module: pl.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        if self.unfreeze_at_epoch is None or epoch != self.unfreeze_at_epoch:
            return
        modules = last_layers(backbone_of(pl_module), self.unfreeze_last)
        self.make_trainable(modules)
        params = list({id(p): p for m in modules for p in m.parameters()}.values())
        ids = {id(p) for p in params}
        # the module's optimizer may already hold the frozen parameters (at the full rate): move them out.
        # (Not BaseFinetuning.unfreeze_and_add_param_group: its filter_on_optimizer matches parameters by value,
        # torch.equal, so it skips e.g. every BatchNorm weight still all ones.)
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        if params:
            optimizer.add_param_group({"params": params, "lr": optimizer.param_groups[0]["lr"] * self.lr_ratio})

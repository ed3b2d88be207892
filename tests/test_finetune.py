"""Fine-tuning schemes: frozen trains only the head; two_phase unfreezes the backbone's last layers later, at a
lower learning rate."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from bloodfl.models import build_classifier
from bloodfl.training.finetune import BackboneFinetune, last_layers
from bloodfl.training.module import ClassifierModule


def _fit(callback: BackboneFinetune, epochs: int, tmp_path: Path) -> tuple[ClassifierModule, pl.Trainer, dict]:
    torch.manual_seed(0)
    net = build_classifier("simple_cnn", 3, 16)
    module = ClassifierModule(net, num_classes=3, optimizer=lambda p: torch.optim.Adam(p, lr=1e-2))
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    data = TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0]))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=[callback], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=2))
    return module, trainer, before


def test_frozen_trains_only_the_head(tmp_path: Path) -> None:
    module, _, before = _fit(BackboneFinetune(unfreeze_at_epoch=None), 2, tmp_path)
    after = module.net.state_dict()
    assert all(not p.requires_grad for p in module.net.backbone.parameters())
    assert all(p.requires_grad for p in module.net.head.parameters())
    for key, value in after.items():  # BatchNorm running statistics too: the backbone is a fixed extractor
        changed = not torch.equal(before[key], value)
        assert changed == key.startswith("head."), key


def test_two_phase_unfreezes_last_layers_at_a_lower_rate(tmp_path: Path) -> None:
    callback = BackboneFinetune(unfreeze_at_epoch=1, unfreeze_last=2, lr_ratio=0.1)
    module, trainer, before = _fit(callback, 2, tmp_path)
    backbone = module.net.backbone
    unfrozen = last_layers(backbone, 2)
    assert [type(m).__name__ for m in unfrozen] == ["Conv2d", "BatchNorm2d"]  # the last conv block
    thawed = {id(p) for m in unfrozen for p in m.parameters()}
    for p in backbone.parameters():
        assert p.requires_grad == (id(p) in thawed)
    groups = trainer.optimizers[0].param_groups
    assert len(groups) == 2 and groups[1]["lr"] == groups[0]["lr"] * 0.1
    assert {id(p) for p in groups[1]["params"]} == thawed
    assert not thawed & {id(p) for p in groups[0]["params"]}
    after = module.net.state_dict()
    last_conv = [k for k in after if k.startswith("backbone.") and k.endswith(".weight")][-2]
    first_conv = "backbone.features.0.0.weight"
    assert not torch.equal(before[last_conv], after[last_conv])  # trained in phase 2
    assert torch.equal(before[first_conv], after[first_conv])  # never unfrozen


def test_two_phase_before_unfreezing_is_frozen(tmp_path: Path) -> None:
    module, trainer, _ = _fit(BackboneFinetune(unfreeze_at_epoch=5, unfreeze_last=2), 1, tmp_path)
    assert all(not p.requires_grad for p in module.net.backbone.parameters())
    assert len(trainer.optimizers[0].param_groups) == 1


def test_whole_backbone_when_unfreeze_last_is_null(tmp_path: Path) -> None:
    module, _, _ = _fit(BackboneFinetune(unfreeze_at_epoch=1, unfreeze_last=None), 2, tmp_path)
    assert all(p.requires_grad for p in module.net.parameters())


def test_two_phase_from_the_config_through_train(tmp_path: Path) -> None:
    from bloodfl.training.run import train
    from tests.conftest import FAST, compose_cfg

    cfg = compose_cfg([*FAST, "finetune=two_phase", "finetune.callback.unfreeze_at_epoch=1", "trainer.max_epochs=2",
                       "dataset.image_size=16"], tmp_path)
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0

"""Centralized training. Examples:

    python train.py                                    # simple_cnn on the embedded synthetic data
    python train.py dataset=pbc model=resnet18
    python train.py -m model=vgg16,resnet50,inception_v3 trainer.max_epochs=1
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from bloodfl.console import bool_group_choices, quiet_known_notices, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    from bloodfl.training.run import train

    metrics = train(cfg)
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if isinstance(value, (int, float)) else None


if __name__ == "__main__":
    quiet_known_notices()
    bool_group_choices(Path(__file__).parent / "conf")
    main()

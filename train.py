"""Centralized training. Examples:

    python train.py                                    # simple_cnn on the embedded synthetic data
    python train.py dataset=pbc model=resnet18
    python train.py -m model=vgg16,resnet50,inception_v3 trainer.max_epochs=1
"""

import hydra
from omegaconf import DictConfig

from bloodfl.console import launch, optimized_value, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    from bloodfl.training.run import train

    return optimized_value(cfg, train(cfg))


if __name__ == "__main__":
    launch(main)

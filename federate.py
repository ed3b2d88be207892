"""Federated training (simulated clients, FedAvg by default). Examples:

    python federate.py                                               # 5 iid clients on synthetic data
    python federate.py dataset=all_pbs dp=true                       # DP-SGD in every client (docs/privacy.md)
    python federate.py dataset=rbc fl.partition=random_size fl.rounds=50 fl.local_epochs=1   # papers/000
    python federate.py fl.resume=true hydra.run.dir=<the interrupted run's directory>
"""

import hydra
from omegaconf import DictConfig

from bloodfl.console import launch, optimized_value, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="federate")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    from bloodfl.fl.run import federate

    return optimized_value(cfg, federate(cfg))


if __name__ == "__main__":
    launch(main)

"""bloodfl as a Flower App: the components ``[tool.flwr.app.components]`` in pyproject.toml names.

``flwr run . <superlink>`` ships this package to a SuperLink; its ServerApp (``server_app``) runs the federated
run inside bloodfl's run skeleton at the coordinating site, and every site's SuperNode runs ``client_app`` on
its own images (``--node-config "site-id=K data-dir='/its/images'"``). The run config (pyproject's
``[tool.flwr.app.config]``, or ``flwr run --run-config``):

- ``overrides``: bloodfl's Hydra overrides, the words after ``python federate.py`` (e.g. ``"fl.rounds=20
  dp=true"``); the server and every site compose the same config from them;
- ``out-dir``: where the server writes the run's outputs (``""``: ``logs/federate/runs/<time>`` under the
  SuperLink's working directory).

See docs/federated.md, "Running across sites".
"""

from __future__ import annotations

import logging
import time

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from bloodfl.fl.flower import compose_config, make_client_app

client_app = make_client_app()
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from omegaconf import open_dict

    from bloodfl.console import quiet_known_notices
    from bloodfl.errors import BloodflError
    from bloodfl.fl.run import FederatedTask
    from bloodfl.runner import run

    quiet_known_notices()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    logging.getLogger("bloodfl").setLevel(logging.INFO)
    out = str(context.run_config.get("out-dir", "")) or None
    cfg = compose_config(str(context.run_config.get("overrides", "")))
    with open_dict(cfg):
        cfg.fl.backend = "flower"
        cfg.paths.output_dir = out or f"{cfg.paths.log_dir}/federate/runs/{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    try:
        run(cfg, FederatedTask(grid=grid))
    except BloodflError as err:  # one line in the ServerApp's log, as federate.py prints it
        logging.getLogger("bloodfl").error("bloodfl: error: %s", err)
        raise

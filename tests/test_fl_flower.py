"""The Flower backend (fl.backend=flower, bloodfl/fl/flower.py): Flower's simulation runtime computes exactly what
the in-process loop computes; under DP a ClientApp's reply is the update and nothing else; a restarted SuperNode
resumes its client's accountant and secret from the site's checkpoint; and the Flower App runs across a real
SuperLink and two SuperNodes on 127.0.0.1."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is not installed: pip install -e '.[flower]' (make install does)")

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402

from bloodfl.compose import Root  # noqa: E402
from bloodfl.errors import BloodflError  # noqa: E402
from bloodfl.fl import flower  # noqa: E402
from bloodfl.fl.run import federate  # noqa: E402
from tests.conftest import ROOT, compose_cfg  # noqa: E402
from tests.test_fl_run import FL_FAST, final_weights, rounds  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # a shared 2-core machine (tests/conftest.py)

TIMING = ("seconds", "fit_seconds", "bn_seconds", "eval_seconds")
DP = ["dp='true'", "dp.target_epsilon=null", "dp.noise_multiplier=1.0"]


def _without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def test_simulation_agrees_with_the_inprocess_backend(tmp_path: Path) -> None:
    """2 clients x 2 rounds in Flower's simulation runtime against the in-process loop, same seed: the same
    computation (same client fits, same bloodfl aggregation, same evaluation), so every per-round number agrees
    exactly, global and local; and the global model learns (the Flower end-to-end idiom)."""
    args = FL_FAST
    inproc = federate(compose_cfg(args, tmp_path / "inprocess", "federate"))
    flwr_run = federate(compose_cfg([*args, "fl.backend=flower"], tmp_path / "flower", "federate"))
    a, b = rounds(tmp_path / "inprocess"), rounds(tmp_path / "flower")
    assert [r["round"] for r in b] == ["1", "2"] and b[0]["clients"] == "0 1"
    assert _without_timing(a) == _without_timing(b)  # test/loss, acc, f1, precision, recall; clients' metrics
    assert float(b[-1]["test/loss"]) < float(b[0]["test/loss"]), b  # the global model learns
    wa, wb = final_weights(tmp_path / "inprocess"), final_weights(tmp_path / "flower")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    same = [k for k in inproc if "/" in k and not k.startswith("time/")]  # wall times differ, the rest not
    assert {k: inproc[k] for k in same} == {k: flwr_run.get(k) for k in same}
    assert flwr_run["backend"] == "flower" and inproc["backend"] == "inprocess"
    out = tmp_path / "flower"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(float(b[-1]["test/acc"])) and "test/auroc_macro" in saved
    for name in ("figures/learning_curves.png", "partition.csv", "splits.csv", "test_per_class.csv",
                 "checkpoints/round_002.pt"):
        assert (out / name).exists(), name


def test_dp_simulation_agrees_with_the_inprocess_backend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same under dp=true, once both backends' clients hold the same secrets (by design two runs never do:
    each client's noise comes from a secret made at random): identical global metrics and final weights, and
    privacy.json -- which the flower backend assembles from the sites' own saved state -- reports the same
    epsilon and steps for every client. The server's rounds.csv has no epsilon with Flower: it never learns it."""
    from bloodfl.privacy.engine import ClientPrivacy, ClientSecret

    real_init = ClientPrivacy.__init__

    def known_secret(self: ClientPrivacy, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.secret = ClientSecret(secret=int(self.name.removeprefix("client")) + 1)

    monkeypatch.setattr(ClientPrivacy, "__init__", known_secret)
    args = [*FL_FAST, *DP]
    federate(compose_cfg(args, tmp_path / "inprocess", "federate"))
    federate(compose_cfg([*args, "fl.backend=flower"], tmp_path / "flower", "federate"))
    a, b = rounds(tmp_path / "inprocess"), rounds(tmp_path / "flower")
    shared = [k for k in b[0] if k not in TIMING and not k.endswith("/epsilon")]
    assert [{k: r[k] for k in shared} for r in a] == [{k: r[k] for k in shared} for r in b]
    assert all(r[f"client{c}/epsilon"] == "" for r in b for c in (0, 1)) and float(a[0]["client0/epsilon"]) > 0
    wa, wb = final_weights(tmp_path / "inprocess"), final_weights(tmp_path / "flower")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    pa, pb = (json.loads((tmp_path / d / "privacy.json").read_text())["clients"] for d in ("inprocess", "flower"))
    assert [(c["epsilon"], c["steps"]) for c in pa] == [(c["epsilon"], c["steps"]) for c in pb]
    assert (tmp_path / "flower" / "clients" / "client1" / "state" / "round_002.pt").exists()


def _dp_site(tmp_path: Path) -> tuple[flower.SiteSpec, dict, dict[str, torch.Tensor]]:
    """A simulated site's spec, the server's wire settings and initial weights, for calling the ClientApp
    directly as a SuperNode does (no Ray, no network)."""
    cfg = compose_cfg([*FL_FAST, *DP], tmp_path, "federate")
    root = Root(cfg)
    dm = root.datamodule()
    dm.setup("fit")
    weights = {k: v.detach().clone() for k, v in root.network(dm.num_classes).state_dict().items()}
    from omegaconf import OmegaConf

    spec = flower.SiteSpec(config=OmegaConf.to_container(cfg, resolve=True), out=str(tmp_path))  # type: ignore
    return spec, flower.wire_settings(root, dm), weights


def _train(app: object, context: Context, weights: dict[str, torch.Tensor], wire: dict, server_round: int) -> Message:
    config = ConfigRecord({"local_epochs": 1, "seed": 42, "server-round": server_round, **wire})
    msg = Message(RecordDict({"arrays": ArrayRecord.from_torch_state_dict(weights), "config": config}),
                  dst_node_id=context.node_id, message_type=MessageType.TRAIN)
    return app(msg, context)  # type: ignore[operator]


def _context() -> Context:
    return Context(run_id=1, node_id=11, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def test_dp_client_app_releases_only_the_update_and_a_restart_resumes_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Under dp=true the ClientApp's reply -- what Flower puts on the wire -- is the noised weights, a count of 1
    and its site id: no local metric, no example count. A SuperNode restart (an empty context.state) resumes the
    accountant and the secret from the site's checkpoint: round 2 is then bit for bit the round 2 of a node that
    never restarted, and the accountant has counted both rounds once."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_run_id", "_task_id", "_node_id"):  # who sends: set in every Flower process, here by hand
        monkeypatch.setattr(TaskIdentity, key, 1)
    spec, wire, w0 = _dp_site(tmp_path)
    app = flower.make_client_app(spec)
    node = _context()
    r1 = _train(app, node, w0, wire, 1)
    assert not r1.has_error(), r1.error.reason if r1.has_error() else ""
    content = r1.content
    assert set(content.array_records) == {"arrays"} and set(content.array_records["arrays"]) == set(w0)
    assert dict(content.metric_records) == {"metrics": {"num-examples": 1}}
    assert dict(content.config_records) == {"site": {"site-id": 0}}
    w1 = flower.from_arrays(content.array_records["arrays"])
    assert not all(torch.equal(w0[k], w1[k]) for k in w0)
    steps_per_round = json.loads((tmp_path / "clients/client0/privacy.json").read_text())["clients"][0]["steps"]
    assert steps_per_round > 0

    kept = _train(app, copy.deepcopy(node), w1, wire, 2)  # the node that kept running
    restarted = _train(app, _context(), w1, wire, 2)  # a fresh SuperNode: context.state is empty
    wk, wr = (flower.from_arrays(m.content.array_records["arrays"]) for m in (kept, restarted))
    assert all(torch.equal(wk[k], wr[k]) for k in wk)
    report = json.loads((tmp_path / "clients/client0/privacy.json").read_text())["clients"][0]
    assert report["steps"] == 2 * steps_per_round and report["epsilon"] > 0
    local = (tmp_path / "clients/client0.csv").read_text().splitlines()  # the site's own log of its metrics
    # one row per round: the restarted node's round 2 replaced the row the other node wrote for it
    assert local[0].startswith("round,train/loss") and [r.split(",")[0] for r in local[1:]] == ["1", "2"]


def test_backend_settings_fail_with_one_line(tmp_path: Path) -> None:
    with pytest.raises(BloodflError, match="unknown fl.backend 'grpc'"):
        federate(compose_cfg([*FL_FAST, "fl.backend=grpc"], tmp_path / "a", "federate"))
    with pytest.raises(BloodflError, match="client hooks"):
        federate(compose_cfg([*FL_FAST, "fl.backend=flower"], tmp_path / "b", "federate"), client_hook=print)
    with pytest.raises(BloodflError, match="fl.resume=true is not supported with fl.backend=flower"):
        federate(compose_cfg([*FL_FAST, "fl.backend=flower", "fl.resume=true"], tmp_path / "c", "federate"))


# ---- a deployment on 127.0.0.1 -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _site_folder(base: Path, seed: int) -> Path:
    """A hospital's own images, one folder per class (what dataset=imagefolder reads)."""
    from PIL import Image

    from bloodfl.data.synthetic import SYNTHETIC_CLASSES, render_synthetic

    images, labels = render_synthetic(6, 32, seed)
    for i, (img, y) in enumerate(zip(images, labels)):
        folder = base / SYNTHETIC_CLASSES[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return base


@pytest.mark.deployment
def test_deployment_superlink_and_two_supernodes_on_loopback(tmp_path: Path) -> None:
    """`flower-superlink`, one `flower-supernode` per site with its own image folder and site id, `flwr run`:
    the run finishes and the coordinating site has the run's outputs. Insecure mode (no TLS) on 127.0.0.1 only;
    every process is stopped by the process id (group) this test started."""
    bin_dir = Path(sys.executable).parent
    port, runtime_ports = _free_port(), [_free_port(), _free_port()]
    home = tmp_path / "flwr_home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}  # SuperNodes start flower-superexec
    started: list[subprocess.Popen] = []

    def start(*cmd: str, log: str) -> None:
        with open(tmp_path / log, "w") as fh:
            started.append(subprocess.Popen([str(bin_dir / cmd[0]), *cmd[1:]], env=env, cwd=tmp_path, stdout=fh,
                                            stderr=subprocess.STDOUT, start_new_session=True))

    out = tmp_path / "server_out"
    try:
        start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
              "--disable-runtime-dependency-installation", log="superlink.log")
        _wait_for_port(port)
        for k in (0, 1):
            node_config = f"site-id={k} data-dir='{_site_folder(tmp_path / f'site{k}_images', k + 1)}' " \
                          f"site-dir='{tmp_path / f'site{k}'}'"
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1",
                  "--port", str(runtime_ports[k]), "--node-config", node_config, log=f"supernode{k}.log")
        overrides = " ".join([*FL_FAST, "fl.rounds=1", *DP])
        done = subprocess.run([str(bin_dir / "flwr"), "run", str(ROOT), "test", "--stream", "--run-config",
                               f"overrides=\"{overrides}\" out-dir=\"{out}\""],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        logs = done.stdout[-3000:] + done.stderr[-2000:]
        assert done.returncode == 0 and (out / "metrics.json").exists(), logs
    finally:
        for proc in started:  # SIGTERM to the group this test started (superexec, app processes included)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in started:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    rows = rounds(out)
    assert [r["round"] for r in rows] == ["1"] and rows[0]["clients"] == "0 1" and float(rows[0]["test/loss"]) > 0
    header = (out / "rounds.csv").read_text().splitlines()[0].split(",")
    assert not [c for c in header if c.startswith("client") and not c.endswith("/epsilon") and c != "clients"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "flower" and metrics["num_clients"] == 2 and "test/acc" in metrics
    for k in (0, 1):  # each site keeps its own budget, state and local metrics; none of it was sent
        report = json.loads((tmp_path / f"site{k}" / "privacy.json").read_text())["clients"][0]
        assert report["steps"] > 0 and report["epsilon"] > 0
        assert (tmp_path / f"site{k}" / "state" / "round_001.pt").exists()
        assert (tmp_path / f"site{k}" / "clients" / f"client{k}.csv").exists()

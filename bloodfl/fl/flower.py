"""The Flower backend (``fl.backend=flower``): bloodfl's clients, strategies and privacy on Flower's Message API.

Nothing here trains or aggregates. A ClientApp builds its site's :class:`~bloodfl.fl.client.FLClient`
(``bloodfl.fl.run.build_client``, as the in-process backend does) and calls ``FLClient.fit``; the ServerApp's
strategy (:class:`FlowerStrategy`, a ``flwr.serverapp.strategy.Strategy``) calls bloodfl's strategy
(``fl.strategies[fl.strategy]``) and the in-process loop's bookkeeping (``Simulation.record_round``: central
evaluation, rounds.csv, checkpoints, plot, loggers).

What crosses the wire, per round and sampled client:
- server -> client (message type ``train``): ArrayRecord ``arrays`` (the global weights) and ConfigRecord
  ``config``: the round's instructions (``round_config``: local_epochs, seed, FedProx' proximal_mu), the round,
  and the federation's class list, image size and normalisation constants (so every site reads its images
  as the server's evaluation does; a site never normalises with statistics of its own images);
- client -> server: ArrayRecord ``arrays`` (its weights after the local fit) and MetricRecord ``metrics`` with
  ``num-examples``: its count, or 1 with ``fl.weighting=uniform`` (the default under DP), plus its local
  train/val metrics -- but none under DP (``FLClient.fit`` keeps them in the site's own log);
- with ``fl.bn_stats=recompute`` and a network with BatchNorm (never under DP: private networks have none),
  after each aggregation: server -> client (message type ``query.bn_stats``) the new global weights and
  ``bn_config``; client -> server the BatchNorm running mean/var of those weights on a few of its training
  batches (ArrayRecord ``arrays``) and their image count (``num-examples``), which the server pools
  (``bloodfl.fl.batchnorm``);
- and a ConfigRecord ``site`` with its site id (which client it is: the node's identity, no data), so that
  rounds.csv and the aggregation order name clients as the in-process backend does. With fl.fraction_fit < 1
  the server asks every node for it once beforehand (message type ``query.site``), to sample by client id.

Client state across rounds (the DP accountant and the client's secret randomness, ``FLClient.state_dict``) lives
in the node's ``context.state`` and in a checkpoint at the site (``<site>/state/round_NNN.pt``): a restarted
SuperNode has an empty ``context.state`` and resumes from the checkpoint. A round asked again (the server
resumed) restarts from the state before it, so it draws the same noise and batches: no second release.
"""

from __future__ import annotations

import contextlib
import io
import logging
import shlex
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy as FlwrStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

from bloodfl.compose import Root
from bloodfl.errors import BloodflError
from bloodfl.fl.client import FLClient
from bloodfl.fl.loop import (
    Simulation,
    bn_config,
    list_checkpoints,
    load_checkpoint,
    round_config,
    sample_clients,
    save_checkpoint,
)
from bloodfl.fl.strategy import FitResult, Weights

log = logging.getLogger("bloodfl")

ARRAYS, CONFIG, METRICS, SITE = "arrays", "config", "metrics", "site"
NUM_EXAMPLES = "num-examples"  # Flower's key for a reply's weight
STATE_KEY = "bloodfl.client"  # the client's state in context.state (a ConfigRecord holding torch.save bytes)
QUERY_SITE = f"{MessageType.QUERY}.site"
QUERY_BN = f"{MessageType.QUERY}.bn_stats"
KEEP_SITE_STATES = 2  # the state after the last round and the one before it (a replayed round starts there)


# ---- weights and state on the wire ------------------------------------------------------------------------

def to_arrays(weights: Weights) -> ArrayRecord:
    return ArrayRecord.from_torch_state_dict(weights)


def from_arrays(record: ArrayRecord) -> Weights:
    # copies: the arrays Flower deserialised are read-only
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def _to_bytes(state: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# ---- the client side ---------------------------------------------------------------------------------------

@dataclass
class SiteSpec:
    """How a simulated ClientApp gets its run: the run's resolved config, its output directory (each simulated
    site keeps its state under ``<out>/clients/clientK/``) and the torch threads per client (the in-process
    backend's count, so that a simulated client computes exactly what an in-process one does)."""

    config: dict[str, Any]
    out: str
    torch_threads: int | None = None


@dataclass
class Site:
    cfg: DictConfig
    cid: int
    data_dir: str | None  # a deployed site's own image folder; None: this client's shard of the central data
    out: Path  # where its local log goes (clients/clientK.csv) and, under state/, its state checkpoints
    state_dir: Path


_DATA: dict[str, Any] = {}  # the decoded data of the last config, per process: a worker serves many messages


def compose_config(overrides: str, output_dir: str | None = None) -> DictConfig:
    """federate.yaml with Hydra ``overrides`` (a command line's ``key=value`` words), outside a Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from bloodfl.config import CONF_DIR
    from bloodfl.console import bool_group_choices

    argv = ["federate.py", *shlex.split(overrides)]
    bool_group_choices(CONF_DIR, argv)  # dp=true as typed on a command line
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="federate", overrides=argv[1:])
    GlobalHydra.instance().clear()
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = output_dir
    return cfg


def _site(context: Context, spec: SiteSpec | None) -> Site:
    node = context.node_config
    if spec is not None:  # simulation: Flower numbers the virtual SuperNodes 0..N-1 (partition-id)
        cid = int(node["partition-id"])
        out = Path(spec.out)
        return Site(OmegaConf.create(spec.config), cid, None, out, out / "clients" / f"client{cid}" / "state")
    if "site-id" in node:
        cid = int(node["site-id"])
    elif "partition-id" in node:  # `flwr run` on a simulation runtime: shard partition-id of the central data
        cid = int(node["partition-id"])
    else:
        raise BloodflError("this SuperNode has no site id: start it with --node-config 'site-id=0 "
                           "data-dir=\"/path/to/images\"' (docs/federated.md, Running across sites)")
    overrides = str(context.run_config.get("overrides", ""))
    data_dir = node.get("data-dir")
    if data_dir is not None:  # the site's own images: its reader replaces the server's data set
        kept = [w for w in shlex.split(overrides) if not w.lstrip("+~").startswith(("dataset", "split"))]
        # every image of the folder is the site's (_build_client); the reader's split must merely be possible
        # on a small folder (a local validation share is held out later, fl.val_fraction)
        overrides = shlex.join([*kept, f"dataset={node.get('dataset', 'imagefolder')}", f"dataset.root={data_dir}",
                                "split=7-2-1", "split.fractions=[0.5,0.5,0.0]", "split.group_by=null"])
    cfg = compose_config(overrides)
    out = Path(str(node.get("site-dir", f"bloodfl-site{cid}"))).resolve()
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return Site(cfg, cid, None if data_dir is None else str(data_dir), out, out / "state")


def _build_client(site: Site, config: ConfigRecord) -> FLClient:
    """This site's client, built fresh for every message (its state comes from context.state or the site's
    checkpoint); the decoded images are cached per process."""
    from bloodfl.fl.run import build_client

    classes = list(config["classes"])  # type: ignore[arg-type]
    normalize = {"mean": list(config["normalize-mean"]), "std": list(config["normalize-std"])}  # type: ignore
    if site.data_dir is not None:  # a deployed site reads its images as the federation does
        with open_dict(site.cfg):
            if site.cfg.dataset.get("classes") is None:  # the federation's labels, in its order
                site.cfg.dataset.classes = classes
            site.cfg.dataset.image_size = int(config["image-size"])  # type: ignore[call-overload]
            site.cfg.dataset.normalize = normalize  # never statistics of the site's own images
    root = Root(site.cfg)
    key = OmegaConf.to_yaml(site.cfg.dataset) + OmegaConf.to_yaml(site.cfg.split) + str(site.cfg.seed)
    if key not in _DATA:
        pl.seed_everything(root.seed, workers=True, verbose=False)  # as the run skeleton, before the data
        dm = root.datamodule()
        dm.setup("fit")
        _DATA.clear()
        _DATA[key] = dm
    dm = _DATA[key]
    if list(dm.classes or []) != classes:
        raise BloodflError(f"site {site.cid}: its classes {list(dm.classes or [])} are not the federation's "
                           f"{classes}; set dataset.classes or give the site one folder per class")
    if site.data_dir is None:  # simulation: this client's shard of the central training split, as in-process
        shard = root.shards(dm)[site.cid]
    else:  # a deployed site: every image of its own folder is its to train on (minus its local validation)
        shard = np.concatenate([dm.idx[s] for s in ("train", "val", "test") if dm.idx.get(s) is not None])
    net = root.network(dm.num_classes)
    return build_client(root, dm, shard, site.cid, net, root.trainer_factory(), site.out, normalize)


def _restore(client: FLClient, context: Context, site: Site, server_round: int) -> None:
    record = context.state.config_records.get(STATE_KEY)
    state = _from_bytes(record["state"]) if record is not None else None  # type: ignore[arg-type]
    if state is None or int(state["round"]) >= server_round:  # SuperNode restarted, or a round asked again
        older = [p for r, p in list_checkpoints(site.state_dir.parent, site.state_dir.name)
                 if r < server_round]
        state = load_checkpoint(older[-1]) if older else None
    if state is not None:
        client.load_state_dict(state["client"])
    elif client.privacy is not None and server_round > 1:
        log.warning("site %d: no saved state before round %d; its accountant starts at zero", site.cid,
                    server_round)


def _save(client: FLClient, context: Context, site: Site, server_round: int) -> None:
    state = client.state_dict()
    if not state:  # without DP a client keeps nothing across rounds
        return
    blob = {"round": server_round, "client": state}
    context.state.config_records[STATE_KEY] = ConfigRecord({"state": _to_bytes(blob)})
    save_checkpoint(site.state_dir / f"round_{server_round:03d}.pt", blob)
    for _, old in list_checkpoints(site.state_dir.parent, site.state_dir.name)[:-KEEP_SITE_STATES]:
        old.unlink()
    if client.privacy is not None:  # the site's own record of its budget (it is not sent)
        from bloodfl.privacy.integration import write_privacy_json

        write_privacy_json(site.state_dir.parent / "privacy.json", [client.privacy])


def make_client_app(spec: SiteSpec | None = None) -> ClientApp:
    """The ClientApp: ``spec`` for Flower's simulation runtime, None for a deployment (the config comes from
    the run config's ``overrides``, the site from the SuperNode's ``--node-config``)."""
    app = ClientApp()

    def open_request(msg: Message, context: Context) -> tuple[Site, FLClient, Weights, int, dict[str, Any]]:
        """(site, its client, the global weights, the round, the instructions) of a train or bn_stats message."""
        if spec is not None and spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        site = _site(context, spec)
        config = msg.content.config_records[CONFIG]
        instructions = {k: v for k, v in config.items() if k not in _TRANSPORT_KEYS}
        return (site, _build_client(site, config), from_arrays(msg.content.array_records[ARRAYS]),
                int(config["server-round"]), instructions)  # type: ignore[arg-type]

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        site, client, weights, server_round, instructions = open_request(msg, context)
        _restore(client, context, site, server_round)
        result = client.fit(weights, server_round, instructions)
        _save(client, context, site, server_round)
        metrics = MetricRecord({NUM_EXAMPLES: int(result.num_examples), **result.metrics})
        return Message(RecordDict({ARRAYS: to_arrays(result.weights), METRICS: metrics, SITE: _site_record(site)}),
                       reply_to=msg)

    @app.query("bn_stats")
    def bn_stats(msg: Message, context: Context) -> Message:
        site, client, weights, server_round, instructions = open_request(msg, context)
        result = client.bn_statistics(weights, server_round, instructions)
        return Message(RecordDict({ARRAYS: to_arrays(result.weights),
                                   METRICS: MetricRecord({NUM_EXAMPLES: int(result.num_examples)}),
                                   SITE: _site_record(site)}), reply_to=msg)

    @app.query("site")
    def which_site(msg: Message, context: Context) -> Message:
        return Message(RecordDict({SITE: _site_record(_site(context, spec))}), reply_to=msg)

    return app


def _site_record(site: Site) -> ConfigRecord:
    """Which client answers: its site id (the node's identity, which the server knows anyway; no data)."""
    return ConfigRecord({"site-id": site.cid})


_TRANSPORT_KEYS = ("server-round", "classes", "image-size", "normalize-mean", "normalize-std")


# ---- the server side ---------------------------------------------------------------------------------------

class RemoteClient:
    """The server's view of a client that lives elsewhere: its id, and no state (that stays at the site)."""

    privacy = None

    def __init__(self, cid: int) -> None:
        self.cid = cid

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FlowerStrategy(FlwrStrategy):
    """Flower's strategy interface around bloodfl's: sampling, instructions and aggregation as in-process.

    sim: the in-process loop's state and bookkeeping (its strategy, weights, history, evaluator, outputs);
    wire: the federation-wide settings every site gets with its instructions (class list, normalisation);
    connect_timeout: how long to wait for all sites' SuperNodes to connect.
    """

    def __init__(self, sim: Simulation, wire: dict[str, Any], connect_timeout: float = 600.0,
                 reply_timeout: float = 3600.0) -> None:
        self.sim = sim
        self.wire = wire
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.nodes: dict[int, int] = {}  # client id -> Flower node id
        self.sampled: list[int] = []
        self.node_ids: list[int] = []  # the nodes of the sampled clients, this round
        self.grid: Grid | None = None  # the grid of the running rounds (Strategy.start gives it to configure_*)
        self.t0 = 0.0

    def summary(self) -> None:
        log.info("flower: bloodfl strategy %s, %d clients", self.sim.strategy.name, self.sim.num_clients)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The node ids of all fl.num_clients SuperNodes, once they are connected."""
        n = self.sim.num_clients
        deadline = time.monotonic() + self.connect_timeout
        while len(node_ids := sorted(grid.get_node_ids())) < n:
            if time.monotonic() > deadline:
                raise BloodflError(f"flower: {len(node_ids)} of fl.num_clients={n} SuperNodes connected within "
                                   f"{self.connect_timeout:.0f} s; start one SuperNode per site")
            time.sleep(0.5)
        if len(node_ids) > n:
            raise BloodflError(f"flower: {len(node_ids)} SuperNodes are connected but fl.num_clients={n}")
        return node_ids

    def connect(self, grid: Grid) -> dict[int, int]:
        """Client id -> node id, asking every node which site it is (needed to sample fl.fraction_fit < 1)."""
        asks = [Message(RecordDict(), dst_node_id=nid, message_type=QUERY_SITE) for nid in self.wait_for_nodes(grid)]
        nodes: dict[int, int] = {}
        for reply in _checked(list(grid.send_and_receive(asks, timeout=self.reply_timeout))):
            nodes[self.site_id(reply, nodes)] = reply.metadata.src_node_id
        if len(nodes) != self.sim.num_clients:
            raise BloodflError(f"flower: {len(nodes)} of {self.sim.num_clients} sites answered")
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.t0 = time.perf_counter()
        s, n = self.sim.settings, self.sim.num_clients
        self.sampled = sample_clients(s.seed, server_round, n, s.fraction_fit)
        if len(self.sampled) == n:  # everybody trains: the same message to every node, no need to know who is who
            node_ids = self.wait_for_nodes(grid)
        else:
            self.nodes = self.nodes or self.connect(grid)
            node_ids = [self.nodes[c] for c in self.sampled]
        self.node_ids, self.grid = node_ids, grid
        instructions = ConfigRecord({**round_config(self.sim.strategy, s, server_round), **self.wire,
                                     "server-round": server_round})
        content = RecordDict({ARRAYS: arrays, CONFIG: instructions})
        return [Message(content, dst_node_id=nid, message_type=MessageType.TRAIN, group_id=str(server_round))
                for nid in node_ids]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        by_client: dict[int, Message] = {}
        for reply in _checked(list(replies)):
            by_client[self.site_id(reply, by_client)] = reply
        missing = [c for c in self.sampled if c not in by_client]
        if missing or len(by_client) != len(self.sampled):  # the in-process loop has no partial rounds either
            raise BloodflError(f"flower: round {server_round}: expected replies from client(s) {self.sampled}, got "
                               f"{sorted(by_client)} within {self.reply_timeout:.0f} s")
        results = [self.fit_result(by_client[c]) for c in self.sampled]  # in client order, as in-process
        t_fit = time.perf_counter()
        sim = self.sim
        sim.weights = sim.strategy.aggregate_fit(server_round, sim.weights, results)
        sim.record_round(server_round, self.sampled, results, self.t0, t_fit, lambda: self.bn_statistics(server_round))
        return to_arrays(sim.weights), None

    def bn_statistics(self, server_round: int) -> list[FitResult]:
        """The round's clients' BatchNorm statistics of the new global weights (``query.bn_stats``), in client
        order."""
        assert self.grid is not None
        config = ConfigRecord({**bn_config(self.sim.settings), **self.wire, "server-round": server_round})
        content = RecordDict({ARRAYS: to_arrays(self.sim.weights), CONFIG: config})
        asks = [Message(content, dst_node_id=nid, message_type=QUERY_BN, group_id=str(server_round))
                for nid in self.node_ids]
        by_client: dict[int, Message] = {}
        for reply in _checked(list(self.grid.send_and_receive(asks, timeout=self.reply_timeout))):
            by_client[self.site_id(reply, by_client)] = reply
        if sorted(by_client) != self.sampled:
            raise BloodflError(f"flower: round {server_round}: expected BatchNorm statistics from client(s) "
                               f"{self.sampled}, got {sorted(by_client)} within {self.reply_timeout:.0f} s")
        return [self.fit_result(by_client[c]) for c in self.sampled]

    def site_id(self, reply: Message, seen: dict[int, Any]) -> int:
        n = self.sim.num_clients
        cid = int(reply.content.config_records[SITE]["site-id"])  # type: ignore[arg-type]
        if not 0 <= cid < n or cid in seen:
            raise BloodflError(f"flower: site id {cid} is {'taken' if cid in seen else 'out of range'}; give the "
                               f"{n} SuperNodes the site ids 0..{n - 1} (--node-config site-id=K)")
        return cid

    @staticmethod
    def fit_result(reply: Message) -> FitResult:
        metrics = dict(reply.content.metric_records[METRICS])
        count = int(metrics.pop(NUM_EXAMPLES))  # type: ignore[call-overload]
        return FitResult(from_arrays(reply.content.array_records[ARRAYS]), count,
                         {k: float(v) for k, v in metrics.items()})  # type: ignore[arg-type]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # the global model is evaluated centrally (Simulation.record_round), as in-process

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def _checked(replies: list[Message]) -> list[Message]:
    for m in replies:
        if m.has_error():
            raise BloodflError(f"flower: site node {m.metadata.src_node_id} failed: {m.error.reason}")
    return replies


def run_rounds(strategy: FlowerStrategy, grid: Grid) -> None:
    """The rounds ``completed + 1 .. rounds`` through Flower's own round loop (``Strategy.start``)."""
    sim = strategy.sim
    strategy.start(grid, to_arrays(sim.weights), num_rounds=sim.settings.rounds - sim.completed,
                   timeout=strategy.reply_timeout)


class InProcessWorkers:
    """A worker pool for Flower's simulation runtime without Ray: ClientApps run one after another in this
    process (Flower's message routing, per-node contexts and grid are unchanged). Why: Ray 2.55's gcs_server and
    raylet listen on all network interfaces (random ports, no setting to bind them to loopback) and take
    ~5 s to start plus one import of torch per actor; a simulation of a few clients does not need them."""

    def __init__(self, backend_config: dict[str, Any]) -> None:
        self.app_fn: Any = None

    def build(self, app_fn: Any) -> None:
        self.app_fn = app_fn

    @property
    def num_workers(self) -> int:
        return 1

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        pass

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        from flwr.clientapp.client_app import ClientAppException, LoadClientAppError

        try:
            return self.app_fn()(message=message, context=context), context
        except LoadClientAppError:
            raise
        except Exception as ex:  # as Flower's Ray actor reports it: an error reply naming the exception
            raise ClientAppException(str(ex)) from ex


def simulate(strategy: FlowerStrategy, spec: SiteSpec, workers: str, client_cpus: float,
             ray_cpus: int | None) -> None:
    """Flower's simulation runtime on this machine: the ServerApp in this process, one virtual SuperNode per
    client; ClientApps in Ray actors of ``client_cpus`` CPUs each (``workers="ray"``) or one after another in
    this process (``workers="inprocess"``, :class:`InProcessWorkers`)."""
    from unittest import mock

    from flwr.simulation import run_simulation

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(strategy, grid)

    # a failing ClientApp comes back as an error reply (BloodflError naming it): the actors' own output is noise
    init_args: dict[str, Any] = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if ray_cpus is not None:
        init_args["num_cpus"] = ray_cpus
    backend = {"client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    # Flower 1.42's runtime always builds a RayBackend (vce_api.start_vce); the in-process pool takes its place
    pool = mock.patch("flwr.server.superlink.fleet.vce.backend.raybackend.RayBackend", InProcessWorkers) \
        if workers == "inprocess" else contextlib.nullcontext()
    flwr_log = logging.getLogger("flwr")
    level = flwr_log.level
    flwr_log.setLevel(logging.ERROR)  # bloodfl logs every round; Flower's per-message lines repeat them
    try:
        with pool:
            run_simulation(server_app=server, client_app=make_client_app(spec),
                           num_supernodes=strategy.sim.num_clients, backend_config=backend)  # type: ignore[arg-type]
    finally:
        flwr_log.setLevel(level)


def load_site_state(out: Path, cid: int) -> dict[str, Any] | None:
    """A simulated site's newest saved client state (for privacy.json at the end of a simulation)."""
    found = list_checkpoints(out / "clients" / f"client{cid}", "state")
    return load_checkpoint(found[-1][1])["client"] if found else None


def wire_settings(root: Root, dm: Any) -> dict[str, Any]:
    """What every site gets with its instructions so that it reads images as the server's evaluation does."""
    norm = dm.normalization
    return {"classes": [str(c) for c in dm.classes or []], "image-size": root.image_size,
            "normalize-mean": [float(v) for v in norm["mean"]], "normalize-std": [float(v) for v in norm["std"]]}


def run_flower(root: Root, dm: Any, out: Path, clients: list[FLClient], strategy: Any, evaluator: Any,
               initial: Weights, meta: dict[str, Any], loggers: list[Any], eval_split: str,
               grid: Grid | None = None) -> Simulation:
    """The rounds on Flower: with ``grid`` (a deployment's ServerApp) over the connected SuperNodes, else in
    Flower's simulation runtime with ``clients`` -- the in-process backend's clients, built here only to report
    their privacy at the end from the state their ClientApps saved. Returns the finished round bookkeeping."""
    settings = root.round_settings()
    n = int(root.fl.num_clients)
    sim = Simulation([RemoteClient(c) for c in range(n)], strategy, evaluator, settings, out, initial, meta=meta,
                     loggers=loggers, eval_split=eval_split, private=root.dp_settings() is not None)
    wire = wire_settings(root, dm)
    opts = root.flower_settings()
    flower = FlowerStrategy(sim, wire, connect_timeout=float(opts.get("connect_timeout", 600)),
                            reply_timeout=float(opts.get("reply_timeout", 3600)))
    if grid is not None:
        run_rounds(flower, grid)
        return sim
    spec = SiteSpec(config=OmegaConf.to_container(root.cfg, resolve=True), out=str(out),  # type: ignore[arg-type]
                    torch_threads=torch.get_num_threads())
    workers, ray_cpus = str(opts.get("workers", "inprocess")), opts.get("ray_cpus")
    if workers not in ("inprocess", "ray"):
        raise BloodflError(f"unknown fl.flower.workers {workers!r}; valid: inprocess, ray")
    simulate(flower, spec, workers, float(opts.get("client_cpus", 1)), None if ray_cpus is None else int(ray_cpus))
    if sim.completed != settings.rounds:
        raise BloodflError(f"flower: the simulation stopped after round {sim.completed} of {settings.rounds} "
                           "(see the log above)")
    for client in clients:  # the simulated sites' final state: what privacy.json reports
        state = load_site_state(out, client.cid)
        if state is not None:
            client.load_state_dict(state)
    return sim

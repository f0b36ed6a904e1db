"""Where a run trains: one ``tf.distribute`` strategy per process (docs/distributed.md).

``--strategy`` picks it:

* ``auto`` (the default): ``MirroredStrategy`` when more than one GPU is visible (or
  ``--logical_cpus`` splits the CPU), TensorFlow's default strategy otherwise;
* ``default``: one device;
* ``mirrored``: ``MirroredStrategy`` over every local GPU (else every logical CPU);
* ``multi_worker``: ``MultiWorkerMirroredStrategy``, one process per host, from ``TF_CONFIG``;
* ``tpu``: ``TPUStrategy`` on the TPU that ``TPUClusterResolver`` finds.

The recipe keeps a run equal to one device's run: every worker builds the same global
batch and each replica takes its rows (:func:`split_batch`), gradients are summed across
replicas, and the losses are scaled so that the sum is the one-device loss
(:func:`replica_fraction`, ``training_rules.replica_share``). Training on TFRecords with
several workers is the exception: each worker reads its own files (:func:`input_pipelines`)
and builds only its part of the global batch. The chief (:func:`is_chief`) writes the run's
files; the other workers write their checkpoints to temporary directories and delete them.
A worker that loses another one ends with one line naming it and the command that resumes
(:func:`exit_if_a_worker_is_lost`, exit status :data:`WORKER_LOST_EXIT`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import tensorflow as tf

from adj_quant.errors import UserError

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")
#: Seconds a multi-worker start may wait for the other workers (``--worker_timeout``).
DEFAULT_WORKER_TIMEOUT = 300.0
#: Exit status of a worker that lost another worker of its cluster: sysexits' EX_TEMPFAIL
#: (a temporary failure; rerunning the same command resumes).
WORKER_LOST_EXIT = 75
#: The peer watch (:class:`_PeerWatch`): seconds between two probes of every other worker,
#: and how long one probe may wait for an answer.
PEER_PROBE_INTERVAL = 5.0
PEER_PROBE_TIMEOUT = 10.0

_strategies: dict[tuple, tf.distribute.Strategy] = {}


# --------------------------------------------------------------------------- devices


def split_cpu(count: int) -> None:
    """Split the host CPU into ``count`` logical devices (to run ``mirrored`` on one
    machine without GPUs). Must come before TensorFlow sets up its devices."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    except RuntimeError:
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise UserError(f"--logical_cpus {count}: this process already set up TensorFlow "
                            f"with {have} CPU device(s); pass --logical_cpus in a fresh "
                            "process (before anything else runs)") from None


def local_devices() -> list[str]:
    """The devices ``mirrored`` spreads over: every GPU, else every logical CPU."""
    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


# --------------------------------------------------------------------------- TF_CONFIG


def read_tf_config() -> dict:
    """``TF_CONFIG`` checked: a cluster of ``host:port`` workers (and an optional chief)
    and this process's task in it. Problems are one :class:`UserError` line."""
    raw = os.environ.get("TF_CONFIG")
    example = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
               '"task": {"type": "worker", "index": 0}}')
    if not raw:
        raise UserError("--strategy multi_worker needs TF_CONFIG describing the cluster, "
                        f"e.g. TF_CONFIG='{example}' (see docs/distributed.md)")
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as err:
        raise UserError(f"TF_CONFIG is not valid JSON ({err.msg} at character {err.pos}); "
                        f"set it like {example}") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict):
        raise UserError(f"TF_CONFIG has no \"cluster\" object; set it like {example}")
    cluster, task = config["cluster"], config.get("task")
    jobs = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    if not jobs:
        raise UserError("TF_CONFIG's cluster names no \"worker\" (or \"chief\") addresses; "
                        f"set it like {example}")
    for job, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise UserError(f"TF_CONFIG cluster.{job} must be a non-empty list of "
                            f"\"host:port\" strings, got {addresses!r}")
        for address in addresses:
            if not isinstance(address, str) or not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
                raise UserError(f"TF_CONFIG cluster.{job} holds {address!r}, not a "
                                "\"host:port\" address")
    if not isinstance(task, dict) or not isinstance(task.get("type"), str):
        raise UserError("TF_CONFIG has no \"task\" with a \"type\" (this process's job, e.g. "
                        "{\"type\": \"worker\", \"index\": 0})")
    kind, index = task["type"], task.get("index", 0)
    if kind not in jobs:
        raise UserError(f"TF_CONFIG task type {kind!r} is not a job of the cluster "
                        f"({', '.join(jobs)})")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(jobs[kind]):
        raise UserError(f"TF_CONFIG task index {index!r} names no {kind}: the cluster has "
                        f"{len(jobs[kind])} (indices 0..{len(jobs[kind]) - 1})")
    return config


class _Watchdog:
    """Ends this process with one line if the cluster is not up within ``seconds``.

    TensorFlow waits for every worker of ``TF_CONFIG`` without a time limit, inside C++
    that holds the interpreter: neither a Python thread nor a signal handler gets to run.
    A small watchdog process does: it prints the line and kills this one, unless this one
    stops it first."""

    CODE = ("import os, sys, time\n"
            "parent, seconds, line = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]\n"
            "time.sleep(seconds)\n"
            "if os.getppid() == parent:\n"
            "    sys.stderr.write(line + '\\n'); sys.stderr.flush(); os.kill(parent, 9)\n")

    def __init__(self, seconds: float, addresses: list[str]):
        self.seconds = seconds
        self.line = (f"error: --strategy multi_worker: the workers of TF_CONFIG "
                     f"({', '.join(addresses)}) did not all connect within {seconds:g} s "
                     "(--worker_timeout); start every worker with its own TF_CONFIG task and "
                     "check the addresses and ports")
        self.process = None

    def __enter__(self):
        self.process = subprocess.Popen(
            [sys.executable, "-c", self.CODE, str(os.getpid()), str(self.seconds), self.line],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()


def _multi_worker(timeout: float) -> tf.distribute.Strategy:
    config = read_tf_config()
    addresses = [a for job in ("chief", "worker") for a in config["cluster"].get(job, [])]
    started = time.monotonic()
    with _Watchdog(timeout, addresses):
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        barrier(strategy)  # every worker is up and reachable
    _watch_peers(config, timeout)
    print(f"[distribute] {strategy.num_replicas_in_sync} replicas on {len(addresses)} workers "
          f"(this is task {config['task']['type']}:{config['task'].get('index', 0)}), "
          f"connected in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return strategy


# --------------------------------------------------------------------------- a lost worker
#
# When a worker of a multi-worker run dies, TensorFlow aborts the collective ops of the
# others: the next all-reduce raises an ``UnavailableError`` (the peer's connection is
# reset or refused, or the coordination service saw its heartbeats stop). The survivors
# turn that into one line naming the lost worker (:func:`exit_if_a_worker_is_lost`). Where
# no collective op would ever fail (a peer that vanished without closing its connections),
# a thread probing the other workers (:class:`_PeerWatch`) ends the wait instead.

#: The multi-worker cluster of this process (set once its strategy is up), else ``None``.
_cluster: dict | None = None
_exiting = threading.Lock()


def _task_name(job: str, index: int) -> str:
    return f"/job:{job}/replica:0/task:{index}"


def _watch_peers(config: dict, timeout: float) -> None:
    global _cluster
    own = _task_name(config["task"]["type"], config["task"].get("index", 0))
    peers = {_task_name(job, i): address for job in ("chief", "worker")
             for i, address in enumerate(config["cluster"].get(job, []))}
    peers.pop(own)
    _cluster = {"peers": peers, "watch": _PeerWatch(peers, timeout)}
    _cluster["watch"].start()


def _probe(peer: str, timeout: float) -> bool:
    """Whether ``peer`` (a task name) answers a health check within ``timeout`` seconds."""
    from tensorflow.python.eager import context  # noqa: PLC0415 (TensorFlow's own probe)

    try:
        context.context().check_collective_ops_peer_health(
            peer, timeout_in_ms=int(timeout * 1000))
        return True
    except Exception:  # noqa: BLE001 (an unreachable peer raises several kinds)
        return False


class _PeerWatch(threading.Thread):
    """Probes every other worker each :data:`PEER_PROBE_INTERVAL` seconds; one that has not
    answered for ``timeout`` seconds (``--worker_timeout``) is lost: this process ends with
    the one line of :func:`worker_lost`.

    A backstop only: a dead peer normally makes the next collective op fail at once. It
    waits a whole ``--worker_timeout`` so that a worker that finished its command and
    exited before this one is not taken for a lost one. (TensorFlow's own collective
    timeout, ``CommunicationOptions(timeout_seconds=...)``, would start a sleeping thread
    for every collective op: hundreds a step with synchronised batch norm.)"""

    def __init__(self, peers: dict, timeout: float):
        super().__init__(name="adjq-peer-watch", daemon=True)
        self.peers, self.timeout = peers, timeout
        self.stopped = threading.Event()

    def run(self):
        answered = {peer: time.monotonic() for peer in self.peers}
        while not self.stopped.wait(PEER_PROBE_INTERVAL):
            for peer in self.peers:
                if _probe(peer, PEER_PROBE_TIMEOUT):
                    answered[peer] = time.monotonic()
                elif (time.monotonic() - answered[peer] >= self.timeout
                      and not self.stopped.is_set()):
                    worker_lost([peer], f"it has not answered for {self.timeout:g} s "
                                        "(--worker_timeout)")

    def stop(self):
        self.stopped.set()


def lost_workers(err: BaseException) -> list[str] | None:
    """The workers whose loss made the op error ``err`` fail (task names, or ``["another
    worker"]`` when none can be named), or ``None`` when ``err`` is not a lost worker's."""
    if _cluster is None or not isinstance(err, tf.errors.OpError):
        return None
    message = str(err)
    aborted = isinstance(err, (tf.errors.UnavailableError, tf.errors.AbortedError,
                               tf.errors.DeadlineExceededError, tf.errors.CancelledError)) or (
        "Collective ops is aborted" in message or "unhealthy" in message)
    if not aborted:
        return None
    # The peers that do not answer now are the lost ones; else the ones the message names.
    lost = [peer for peer in _cluster["peers"] if not _probe(peer, 2.0)]
    if not lost:
        named = {f"/job:{job}/replica:0/task:{index}"
                 for job, index in re.findall(r"/job:(\w+)/replica:\d+/task:(\d+)", message)}
        lost = [peer for peer in _cluster["peers"] if peer in named]
    return lost or ["another worker"]


def worker_lost(lost: list[str], how: str, argv: list[str] | None = None) -> None:
    """Print the one line naming the lost worker(s) and the command that resumes, and end
    this process with :data:`WORKER_LOST_EXIT` (at once: TensorFlow's teardown may wait for
    the lost worker). Only the first caller prints; a second one waits for the exit."""
    if not _exiting.acquire(blocking=False):
        threading.Event().wait()
    if _cluster is not None:
        _cluster["watch"].stop()
    peers = _cluster["peers"] if _cluster else {}
    names = ", ".join(f"{p} ({peers[p]})" if p in peers else p for p in lost)
    program = sys.argv[0]
    command = ["python", program] if program.endswith(".py") else [os.path.basename(program)]
    command += list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    print(f"error: --strategy multi_worker: lost worker {names}: {how}; this worker stopped "
          "too, and the run directory holds only complete checkpoints. To resume, start every "
          "worker again (each with its own TF_CONFIG) with the same command: "
          f"{shlex.join(command)}", file=sys.stderr, flush=True)
    os._exit(WORKER_LOST_EXIT)


@contextlib.contextmanager
def exit_if_a_worker_is_lost(argv: list[str] | None = None):
    """Around a command's work: an op error caused by a lost worker becomes the one line of
    :func:`worker_lost`; on the way out, the peer watch stops (the other workers may end
    before this one)."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 (only a lost worker's op errors are handled)
        lost = lost_workers(err)
        if lost is None:
            raise
        worker_lost(lost, f"{type(err).__name__} in a collective op", argv)
    finally:
        if _cluster is not None:
            _cluster["watch"].stop()


def _tpu() -> tf.distribute.Strategy:
    name = os.environ.get("TPU_NAME", "local")
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=name)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    except Exception as err:  # noqa: BLE001 (the resolver raises many kinds without a TPU)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = reason.split(". ")[0][:160]
        raise UserError(f"--strategy tpu: no TPU found (TPU_NAME={name}: {reason}); run on a "
                        "TPU VM, set TPU_NAME to your TPU, or pick another --strategy") from None


# --------------------------------------------------------------------------- the strategy


def get_strategy(name: str = "auto", *, logical_cpus: int = 1,
                 worker_timeout: float = DEFAULT_WORKER_TIMEOUT) -> tf.distribute.Strategy:
    """The strategy ``name`` (created once per process and reused by every stage)."""
    if name not in STRATEGIES:
        raise UserError(f"--strategy {name!r}: use one of {', '.join(STRATEGIES)}")
    key = (name, logical_cpus)
    if key in _strategies:
        return _strategies[key]
    split_cpu(logical_cpus)
    if name == "auto":
        many = len(tf.config.list_logical_devices("GPU")) > 1 or logical_cpus > 1
        name = "mirrored" if many else "default"
    if name == "default":
        strategy = tf.distribute.get_strategy()
    elif name == "mirrored":
        devices = local_devices()
        if len(devices) == 1:
            print(f"warning: --strategy mirrored sees one device ({devices[0]}); running on "
                  "it as a single replica", file=sys.stderr)
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif name == "multi_worker":
        strategy = _multi_worker(worker_timeout)
    else:
        strategy = _tpu()
    _strategies[key] = strategy
    return strategy


def is_distributed(strategy: tf.distribute.Strategy) -> bool:
    return strategy.num_replicas_in_sync > 1


def task(strategy: tf.distribute.Strategy) -> tuple[str | None, int]:
    """``(job, index)`` of this process in a multi-worker cluster, ``(None, 0)`` otherwise."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "task_type", None):
        return None, 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes the run's files: always, except on the workers of a
    multi-worker cluster other than the chief (the ``chief`` task, else worker 0)."""
    strategy = strategy or tf.distribute.get_strategy()
    job, index = task(strategy)
    if job is None or job == "chief":
        return True
    if job != "worker":
        return False
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    return index == 0 and "chief" not in jobs


def input_pipelines(strategy: tf.distribute.Strategy) -> tuple[int, int]:
    """``(count, index)``: one input pipeline per worker process, and this process's.

    The index is the worker's position in the cluster as ``MultiWorkerMirroredStrategy``
    numbers it (the ``chief`` task first, then the workers in order), so pipeline ``i``
    feeds the global replicas ``i * local, ..., (i + 1) * local - 1``."""
    job, index = task(strategy)
    if job not in ("chief", "worker"):
        return 1, 0
    jobs = strategy.cluster_resolver.cluster_spec().as_dict()
    chiefs = len(jobs.get("chief", []))
    count = chiefs + len(jobs.get("worker", []))
    return count, (index if job == "chief" else chiefs + index)


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Wait until every replica of every worker got here (a sum over all of them)."""
    if strategy.num_replicas_in_sync > 1:
        _barrier_function(strategy)().numpy()


_barriers: dict[int, tf.types.experimental.PolymorphicFunction] = {}


def _barrier_function(strategy):
    if id(strategy) not in _barriers:
        @tf.function
        def count():
            return strategy.reduce(tf.distribute.ReduceOp.SUM,
                                   strategy.run(lambda: tf.ones([])), axis=None)

        _barriers[id(strategy)] = count
    return _barriers[id(strategy)]


# --------------------------------------------------------------------------- per replica


def replica_rows(total: int, replicas: int, replica: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of a ``total``-row batch for ``replica`` of ``replicas``:
    consecutive, in replica order, sizes differing by at most one."""
    return replica * total // replicas, (replica + 1) * total // replicas


def split_batch(strategy: tf.distribute.Strategy, *tensors, per_worker: bool = False):
    """Give each replica its rows of a batch.

    By default every worker holds the same global batch and each replica takes its rows of
    it. With ``per_worker`` each worker holds only its own part (its rows
    :func:`replica_rows` ``(global, workers, index)`` of :func:`input_pipelines`), which its
    local replicas split among themselves. With one replica the tensors are returned as
    they are.
    """
    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return tensors
    total = int(tensors[0].shape[0])
    pipelines, position = input_pipelines(strategy) if per_worker else (1, 0)
    local = replicas // pipelines

    def rows(context):
        replica = context.replica_id_in_sync_group - position * local
        start, stop = replica_rows(total, local, replica)
        return tuple(t[start:stop] for t in tensors)

    return strategy.experimental_distribute_values_from_function(rows)


def replica_fraction(images: tf.Tensor, global_batch: int) -> tf.Tensor:
    """This replica's share of the global batch (its rows / all rows)."""
    return tf.cast(tf.shape(images)[0], tf.float32) / float(global_batch)


def all_reduce_sum(values: list):
    """Sum ``values`` (some may be ``None``) over all replicas, in replica context."""
    present = [i for i, v in enumerate(values) if v is not None]
    if not present:
        return values
    context = tf.distribute.get_replica_context()
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, [values[i] for i in present])
    result = list(values)
    for i, value in zip(present, summed):
        result[i] = value
    return result


def reduce_sum(strategy: tf.distribute.Strategy, value):
    return strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)


def reduce_min_max(strategy: tf.distribute.Strategy, low, high):
    """Element-wise minimum of ``low`` and maximum of ``high`` (nests of per-replica
    tensors) over every replica. ``tf.distribute`` reduces only sums and means, so each
    tensor is gathered along a new leading axis, then reduced. (Tensor by tensor:
    ``strategy.gather`` of a whole dict returned one replica's values.)"""
    if strategy.num_replicas_in_sync == 1:
        return low, high

    def over_replicas(values, reduce):
        gathered = [strategy.gather(strategy.run(lambda t: t[None], (value,)), axis=0)
                    for value in tf.nest.flatten(values)]
        return tf.nest.pack_sequence_as(values, [reduce(g, 0) for g in gathered])

    return over_replicas(low, tf.reduce_min), over_replicas(high, tf.reduce_max)

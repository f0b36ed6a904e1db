"""A lost worker of a multi-worker run: which one TensorFlow's error names, and the line
the survivor ends with (the processes themselves: tests/test_distributed.py)."""

import os
import subprocess
import sys

import pytest
import tensorflow as tf

from adj_quant import distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = {"/job:worker/replica:0/task:0": "127.0.0.1:5000",
         "/job:worker/replica:0/task:2": "127.0.0.1:5002"}


@pytest.fixture
def cluster(monkeypatch):
    """This process as task 1 of three workers, whose peers answer ``answering``."""
    answering = set(PEERS)
    monkeypatch.setattr(distribution, "_cluster", {"peers": PEERS})
    monkeypatch.setattr(distribution, "_probe", lambda peer, timeout: peer in answering)
    return answering


# TensorFlow's messages, as a survivor saw them when the other worker was killed.
RESET = ("Collective ops is aborted by: recvmsg:Connection reset by peer\n"
         "Additional GRPC error information from remote target /job:worker/replica:0/task:2 "
         "while calling /tensorflow.WorkerService/RecvBuf:\n:UNKNOWN:Error received from peer")
UNHEALTHY = ("Collective ops is aborted by: The following tasks are unhealthy (stopped sending "
             "heartbeats):\n/job:worker/replica:0/task:0\n")


def test_the_peer_that_does_not_answer_is_the_lost_one(cluster):
    cluster.discard("/job:worker/replica:0/task:0")
    # The message names task 2 (it relayed the abort); the probe finds task 0 gone.
    err = tf.errors.UnavailableError(None, None, RESET)
    assert distribution.lost_workers(err) == ["/job:worker/replica:0/task:0"]


@pytest.mark.parametrize("message, lost", [(RESET, "/job:worker/replica:0/task:2"),
                                           (UNHEALTHY, "/job:worker/replica:0/task:0")])
def test_else_the_message_names_it(cluster, message, lost):
    assert distribution.lost_workers(tf.errors.UnavailableError(None, None, message)) == [lost]


def test_other_errors_are_not_a_lost_worker(cluster, monkeypatch):
    assert distribution.lost_workers(tf.errors.InvalidArgumentError(None, None, "shape")) is None
    assert distribution.lost_workers(ValueError("no")) is None
    monkeypatch.setattr(distribution, "_cluster", None)  # not a multi-worker run
    assert distribution.lost_workers(tf.errors.UnavailableError(None, None, RESET)) is None


def test_the_survivor_ends_with_one_line_and_status_75(tmp_path):
    code = ("import sys, threading\n"
            "from adj_quant import distribution as d\n"
            "d._cluster = {'peers': {'/job:worker/replica:0/task:0': 'h:1'}, "
            "'watch': type('W', (), {'stop': lambda self: None})()}\n"
            "with d.exit_if_a_worker_is_lost(['--stage', 'qat8', '--run_dir', 'runs/a b']):\n"
            "    import tensorflow as tf\n"
            f"    raise tf.errors.UnavailableError(None, None, {UNHEALTHY!r})\n")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == distribution.WORKER_LOST_EXIT == 75
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "lost worker /job:worker/replica:0/task:0 (h:1): UnavailableError" in lines[0]
    assert lines[0].endswith("same command: -c --stage qat8 --run_dir 'runs/a b'")


def test_a_peer_silent_for_the_timeout_ends_the_worker(tmp_path):
    """The peer watch, when no collective op fails: a peer that does not answer its probes
    for --worker_timeout seconds is lost."""
    code = ("import time\n"
            "from adj_quant import distribution as d\n"
            "d.PEER_PROBE_INTERVAL = 0.1\n"
            "d._probe = lambda peer, timeout: peer.endswith('task:0')\n"
            "peers = {'/job:worker/replica:0/task:0': 'h:0', '/job:worker/replica:0/task:2': "
            "'h:2'}\n"
            "d._cluster = {'peers': peers, 'watch': d._PeerWatch(peers, 1.0)}\n"
            "d._cluster['watch'].start()\n"
            "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", code, "--stage", "calibrate"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=100)
    assert done.returncode == 75, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert ("lost worker /job:worker/replica:0/task:2 (h:2): it has not answered for 1 s "
            "(--worker_timeout)") in lines[0]
    assert lines[0].endswith("same command: -c --stage calibrate")

"""``--ranks N`` / ``--hostfile FILE``: this process becomes rank 0 and starts the other ranks.

The ranks are started the way ``mlx.launch`` starts them, with its own code (its hostfile parser and its
per-rank launch script: a pid file, the working directory, the environment, ``ssh`` for another host), but
rank 0 is this very process: the host's stdin and stdout reach it directly. (``mlx.launch`` as the parent
would relay them by polling: up to 0.1 s per line, and its relay threads keep ~1.3 CPU cores busy.)
``mlx.launch ... -m worker`` works too; the ranks then find their world in the environment it sets.
"""

import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
from typing import Optional

log = logging.getLogger("worker")

RING_PORT = 32323  # mlx.launch's --starting-port, for ranks on other hosts
NCCL_PORT = 12345  # mlx.launch's --nccl-port


def _free_ports(n: int) -> list:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def hosts_for(ranks: Optional[int], hostfile: Optional[str]):
    """mlx's ``Hostfile`` for ``--ranks N`` (N ranks on this machine) or ``--hostfile FILE``."""
    from mlx._distributed_utils.common import Hostfile

    if hostfile:
        return Hostfile.from_file(hostfile)
    return Hostfile.from_list("127.0.0.1", ranks)


def ring_hostfile(hosts) -> list:
    """The ring backend's address list: one ``ip:port`` per rank (free ports when every rank is local)."""
    if _all_local(hosts):
        return [[f"127.0.0.1:{p}"] for p in _free_ports(len(hosts.hosts))]
    port, out = RING_PORT, []
    for h in hosts.hosts:
        if not h.ips:
            raise SystemExit(f"mlx-worker: the hostfile gives no ip for {h.ssh_hostname}; the ring backend needs one")
        out.append([f"{h.ips[0]}:{port}"])
        port += 1
    return out


def _all_local(hosts) -> bool:
    return all(h.ssh_hostname == "127.0.0.1" for h in hosts.hosts)


class Followers:
    """Ranks 1..N-1, each started by mlx's launch script; their stdout and stderr go to this stderr."""

    def __init__(self, procs):
        self.procs = procs

    def dead(self) -> list:
        """(rank, exit code) of each follower that exited."""
        return [(rank, p.process.poll()) for rank, p in self.procs if p.process.poll() is not None]

    def stop(self, grace: float = 2.0) -> None:
        """Wait ``grace`` seconds for each follower to end by itself, then kill it: SIGKILL here (a stopped
        process ignores SIGTERM until it runs again), mlx's kill script on another host."""
        for rank, p in self.procs:
            try:
                p.process.wait(grace)
                continue
            except subprocess.TimeoutExpired:
                log.warning("rank %d did not exit: killing it", rank)
            try:
                if getattr(p, "_is_local", True):
                    p.process.kill()
                    p.process.wait(5)
                else:
                    p.terminate()
            except Exception as exc:
                log.warning("rank %d: %s", rank, exc)


def start(ranks: Optional[int], hostfile: Optional[str], backend: Optional[str], argv: list) -> Followers:
    """Start ranks 1..N-1 running ``python -m worker`` with ``argv``; set this process's environment as rank 0."""
    from mlx._distributed_utils.launch import RemoteProcess

    hosts = hosts_for(ranks, hostfile)
    n = len(hosts.hosts)
    backend = backend or hosts.backend or ("nccl" if cuda_available() else "ring")
    env = list(hosts.envs) + [f"MLX_WORKER_BACKEND={backend}"]
    files = {}
    if backend == "ring":
        files["MLX_HOSTFILE"] = json.dumps(ring_hostfile(hosts))
    elif backend == "nccl":
        ip = hosts.hosts[0].ips[0] if hosts.hosts[0].ips else "127.0.0.1"
        port = _free_ports(1)[0] if _all_local(hosts) else NCCL_PORT
        env += [f"NCCL_HOST_IP={ip}", f"NCCL_PORT={port}", f"MLX_WORLD_SIZE={n}"]
    else:
        raise SystemExit(f"mlx-worker: backend {backend!r} is not supported (ring or nccl)")
    _become_rank0(env, files, backend)
    command = ["-m", "worker", *argv]
    procs = []
    for h in hosts.hosts[1:]:
        gpu = h.rank if _all_local(hosts) else 0  # one GPU per rank (mlx.launch's --repeat-hosts)
        rank_env = env + ([f"CUDA_VISIBLE_DEVICES={gpu}"] if backend == "nccl" else [])
        p = RemoteProcess(h.rank, h.ssh_hostname, sys.executable, os.getcwd(), files, rank_env, command)
        _pipe_to_stderr(p, h.rank)
        procs.append((h.rank, p))
    return Followers(procs)


def _become_rank0(env: list, files: dict, backend: str) -> None:
    for e in env:
        key, _, value = e.partition("=")
        os.environ[key] = value
    if backend == "nccl":
        os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    for name, content in files.items():
        fd, path = tempfile.mkstemp(prefix="mlx-worker-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.environ[name] = path
    os.environ["MLX_RANK"] = "0"


def _pipe_to_stderr(p, rank: int) -> None:
    """A follower writes no protocol line: whatever it prints goes to this process's stderr, its first stdout
    line (the launch script's pid file) kept for the kill script."""
    def pump(stream, is_stdout):
        for raw in iter(lambda: stream.read1(65536), b""):
            text = p.preprocess_output(raw.decode(errors="replace"), is_stdout) if is_stdout else raw.decode(
                errors="replace")
            if text:
                sys.stderr.write(text if text.endswith("\n") else text + "\n")
                sys.stderr.flush()

    for stream, is_stdout in ((p.process.stdout, True), (p.process.stderr, False)):
        threading.Thread(target=pump, args=(stream, is_stdout), name=f"rank{rank}-out", daemon=True).start()


def cuda_available() -> bool:
    """Whether MLX runs on CUDA here (then NCCL is the ranks' backend); mlx.core is imported only when asked."""
    import mlx.core as mx

    try:
        return bool(mx.cuda.is_available())
    except AttributeError:
        return False


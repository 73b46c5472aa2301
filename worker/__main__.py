"""``python -m worker`` / ``mlx-worker``: protect stdout, say ready, serve until stdin closes."""

import logging
import os
import signal
import sys


def _protect_stdout() -> int:
    """Keep fd 1 for protocol lines only: save it, then point fd 1 and sys.stdout at stderr.

    Anything else that prints (Python code, C libraries) lands on stderr instead of corrupting
    the stream.
    """
    sys.stdout.flush()
    out_fd = os.dup(1)
    os.set_inheritable(out_fd, False)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out_fd


def library_defaults(env) -> None:
    """Environment defaults for the libraries, where the host set none."""
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # MLX's CUDA graph cache counts its misses over the process's life and throws once they pass twice its
    # size (bench/probes/thrash.py): a long-lived worker (many prompt lengths, batch sizes) would fail a
    # request, and every later GPU operation with it. Off, the cache still evicts.
    env.setdefault("MLX_ENABLE_CACHE_THRASHING_CHECK", "0")


def _parse(argv):
    import argparse

    from .protocol import DEFAULT_MAX_LINE_BYTES

    ap = argparse.ArgumentParser(prog="mlx-worker", description=__doc__)
    ap.add_argument("--max-line-bytes", type=int, default=DEFAULT_MAX_LINE_BYTES,
                    help="longest request line accepted (bytes); longer lines are skipped")
    ap.add_argument("--ranks", type=int, default=None,
                    help="run the model over N ranks (processes) on this machine (PROTOCOL.md, Distributed)")
    ap.add_argument("--hostfile", default=None,
                    help="run the model over the hosts of this mlx hostfile (its first host is this machine)")
    ap.add_argument("--backend", choices=("ring", "nccl"), default=None,
                    help="mx.distributed's backend for the ranks (default: nccl with CUDA, else ring)")
    ap.add_argument("--rank-timeout", type=float, default=60.0,
                    help="seconds a rank may stay silent while a request runs before the worker exits")
    args = ap.parse_args(argv)
    if args.ranks is not None and args.ranks < 1:
        ap.error("--ranks must be at least 1")
    if args.ranks is not None and args.hostfile:
        ap.error("give --ranks or --hostfile, not both")
    return args


def _local_ranks(argv: list, env) -> None:
    """``--ranks N``: N ranks will share this machine's CPUs (the BLAS threads of each, boot/blas_find.py)."""
    for i, a in enumerate(argv):
        value = a.split("=", 1)[1] if a.startswith("--ranks=") else (
            argv[i + 1] if a == "--ranks" and i + 1 < len(argv) else None)
        if value is not None and value.isdigit():
            env.setdefault("MLX_WORKER_LOCAL_RANKS", value)


def _rank_argv(argv: list) -> list:
    """The flags the other ranks get: ours without those that start ranks."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--ranks", "--hostfile", "--backend"):
            skip = True
            continue
        if a.split("=")[0] in ("--ranks", "--hostfile", "--backend"):
            continue
        out.append(a)
    return out


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _local_ranks(argv, os.environ)
    from .boot import blas

    blas.maybe_reexec(argv)
    args = _parse(argv)
    followers = None
    if (args.ranks or 1) > 1 or args.hostfile:
        from .distributed import launch

        followers = launch.start(args.ranks, args.hostfile, args.backend, _rank_argv(argv))
    out_fd = _protect_stdout()
    from .boot import offline

    offline.set_offline_env()  # no model hub, ever: everything is loaded from local directories
    library_defaults(os.environ)
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("MLX_WORKER_LOG", "INFO").upper(),
        format="mlx-worker %(levelname)s: %(message)s",
    )
    from .boot.ready import ready_event
    from .distributed import group
    from .scheduler import MAX_QUEUE
    from .server import Server

    offline.patch_downloads()

    world = group.init()
    ranks = None
    if world is not None:
        ranks = group.describe(world)
    if world is not None and world.rank != 0:
        from .follower import follow

        os._exit(follow(world, ranks))
    server = Server(out_fd, max(64, args.max_line_bytes), world, ranks, args.rank_timeout, followers)
    signal.signal(signal.SIGTERM, lambda *_: server.request_exit(0))
    signal.signal(signal.SIGINT, lambda *_: server.request_exit(0))
    code = server.serve(sys.stdin.buffer, ready_event(server.max_line_bytes, MAX_QUEUE, ranks))
    if followers is not None:
        followers.stop(grace=2.0 if code == 0 else 0.5)  # after a lost rank, the others are not waited for
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()

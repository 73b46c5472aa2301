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
    return ap.parse_args(argv)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    from .boot import blas

    blas.maybe_reexec(argv)
    args = _parse(argv)
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
    from .scheduler import MAX_QUEUE
    from .server import Server

    offline.patch_downloads()

    server = Server(out_fd, max(64, args.max_line_bytes))
    signal.signal(signal.SIGTERM, lambda *_: server.request_exit(0))
    signal.signal(signal.SIGINT, lambda *_: server.request_exit(0))
    code = server.serve(sys.stdin.buffer, ready_event(server.max_line_bytes, MAX_QUEUE))
    logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()

"""``mlx-worker-serve --model PATH --port N``: the OpenAI-compatible server over one worker process.

    mlx-worker-serve --model ~/.cache/mlx-worker/models/SmolLM2-135M-Instruct --port 8000
    # then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")

Worker load options (PROTOCOL.md, load) are flags: --max-concurrent, --kv-bits, --max-kv-size, --cache-dir, ...
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
from pathlib import Path

# flag -> (load option, type); each is sent only when given
LOAD_FLAGS = {
    "--max-concurrent": ("max_concurrent", int), "--kv-bits": ("kv_bits", int),
    "--kv-group-size": ("kv_group_size", int), "--quantized-kv-start": ("quantized_kv_start", int),
    "--max-kv-size": ("max_kv_size", int), "--prefill-step-size": ("prefill_step_size", int),
    "--cache-dir": ("cache_dir", str), "--cache-max-bytes": ("cache_max_bytes", int),
    "--cache-max-entries": ("cache_max_entries", int), "--cache-disk-bytes": ("cache_disk_bytes", int),
    "--draft-model": ("draft_model_path", str), "--dtype": ("dtype", str), "--max-memory": ("max_memory", int),
    "--seed": ("seed", int),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlx-worker-serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a local mlx-lm / mlx-vlm model directory")
    p.add_argument("--served-model-name", help="the model's id in the API (default: the directory's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MLX_WORKER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MLX_WORKER_API_KEY, else none)")
    p.add_argument("--no-local-files", action="store_true",
                   help="refuse image/audio parts naming local files (only data: URLs are then accepted)")
    p.add_argument("--worker-cmd", default=os.environ.get("MLX_WORKER_CMD"),
                   help="the worker command (default: this Python's `-m worker`)")
    p.add_argument("--log-level", default="info")
    load = p.add_argument_group("worker load options (PROTOCOL.md, load)")
    for flag, (_, kind) in LOAD_FLAGS.items():
        load.add_argument(flag, type=kind)
    load.add_argument("--trust-remote-code", action="store_true")
    load.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=None)
    return p


def load_options(args) -> dict:
    opts = {name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _) in LOAD_FLAGS.items()}
    opts = {k: v for k, v in opts.items() if v is not None}
    if args.trust_remote_code:
        opts["trust_remote_code"] = True
    if args.warmup is not None:
        opts["warmup"] = args.warmup
    for key in ("cache_dir", "draft_model_path"):
        if key in opts:
            opts[key] = str(Path(opts[key]).expanduser().resolve())
    return opts


def main(argv=None) -> None:
    import uvicorn

    from openai_server.app import Config, build_app

    args = parser().parse_args(argv)
    model = Path(args.model).expanduser().resolve()
    cfg = Config(model=str(model), name=args.served_model_name or model.name, load_options=load_options(args),
                 api_key=args.api_key or None, worker_cmd=tuple(shlex.split(args.worker_cmd or "")),
                 local_files=not args.no_local_files)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(build_app(cfg), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()

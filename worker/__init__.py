"""mlx-worker: an MLX inference worker speaking newline-delimited JSON on stdin/stdout."""

__version__ = "0.1.0"

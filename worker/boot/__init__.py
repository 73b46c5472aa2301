"""Process start-up: a fast BLAS under MLX (re-exec), no network, the ``ready`` event."""

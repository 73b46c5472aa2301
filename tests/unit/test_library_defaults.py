"""worker/__main__.py's library defaults: set only what the host left unset."""


def test_library_defaults_leave_what_the_host_set():
    """MLX's CUDA graph-cache thrashing check (it throws, and the stream stays broken) is off by default;
    a host's own setting of it, or of the tokenizers' threads, is kept."""
    from worker.__main__ import library_defaults

    env = {}
    library_defaults(env)
    assert env == {"TOKENIZERS_PARALLELISM": "false", "MLX_ENABLE_CACHE_THRASHING_CHECK": "0"}
    env = {"MLX_ENABLE_CACHE_THRASHING_CHECK": "1", "TOKENIZERS_PARALLELISM": "true"}
    library_defaults(env)
    assert env == {"MLX_ENABLE_CACHE_THRASHING_CHECK": "1", "TOKENIZERS_PARALLELISM": "true"}

"""The CUDA backend of a batched decode step: kernels MLX 0.32 lacks, and the routing of a model's calls to them."""

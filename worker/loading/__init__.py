"""Loading a model directory: the mlx-lm text model, its tokenizer, its vision add-on, a draft model, the prompt
cache store."""

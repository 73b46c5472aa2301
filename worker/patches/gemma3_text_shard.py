"""mlx-lm 0.32.2 has no tensor sharding for Gemma 3: ``Model`` in mlx_lm/models/gemma3_text.py has no
``shard(group)`` (llama.py and others have one), and neither has the VLM wrapper mlx_lm/models/gemma3.py
(whose ``language_model`` is a gemma3_text ``Model``), so a Gemma 3 cannot be split over mx.distributed ranks.

``ensure()`` adds a ``shard`` that does what llama.py's does: q/k/v and gate/up projections split by output
("all-to-sharded"), o/down by input ("sharded-to-all", which sums over the group), and each rank keeps
``n_heads / N`` query and ``n_kv_heads / N`` KV heads. q_norm / k_norm act per head and stay whole. It adds
nothing to a class that already has a ``shard`` (once mlx-lm ships its own, theirs is used).

Pinned by tests/unit/test_patches.py::test_mlx_lm_gemma3_text_has_no_shard.
"""

import mlx.core as mx
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models import gemma3, gemma3_text


def _check_divisible(args, n: int) -> None:
    sizes = {"num_attention_heads": args.num_attention_heads, "num_key_value_heads": args.num_key_value_heads,
             "intermediate_size": args.intermediate_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % n]
    if bad:
        raise ValueError(f"cannot shard this Gemma 3 over {n} ranks: {', '.join(bad)} not divisible by {n}")


def shard_text(self, group=None):
    """Tensor-parallel split of a gemma3_text ``Model`` over ``group`` (in place), as llama.py's ``shard``."""
    group = group or mx.distributed.init()
    n = group.size()
    _check_divisible(self.args, n)
    for layer in self.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= n
        attn.n_kv_heads //= n
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)


def shard_vlm(self, group=None):
    """The Gemma 3 VLM wrapper's text model split over ``group``."""
    self.language_model.shard(group)


def ensure() -> None:
    """Give gemma3_text's and gemma3's ``Model`` a ``shard`` where they have none (idempotent)."""
    for cls, fn in ((gemma3_text.Model, shard_text), (gemma3.Model, shard_vlm)):
        if not hasattr(cls, "shard"):
            cls.shard = fn

"""One rank of a tensor-parallel Gemma 3, started as a ring rank by tests/unit/test_patches.py: for each job of
the JSON file named on the command line, load the checkpoint with mlx-lm, shard it with
worker/patches/gemma3_text_shard.py and write the rank's logits (``logits_of``) and its heads per layer.
The test computes the unsharded reference with the same ``logits_of`` on mlx-lm's model."""

import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np


def logits_of(model, ids: list[int], n_decode: int) -> np.ndarray:
    """Logits at every position: all but the last ``n_decode`` ids in one prefill, then those one at a time,
    with the model's own cache (``make_cache``)."""
    cache, split = model.make_cache(), len(ids) - n_decode
    out = [model(mx.array([ids[:split]]), cache=cache)[0]]
    for t in ids[split:]:
        out.append(model(mx.array([[t]]), cache=cache)[0])
    return np.array(mx.concatenate(out).astype(mx.float32))


def main(spec: str) -> None:
    from mlx_lm.utils import load_model

    from worker.patches import gemma3_text_shard

    group = mx.distributed.init(strict=True)
    gemma3_text_shard.ensure()
    for job in json.loads(Path(spec).read_text()):
        model, _ = load_model(Path(job["path"]), lazy=True)
        model.shard(group)
        mx.eval(model.parameters())
        out = f"{job['out']}-rank{group.rank()}"
        np.save(out + ".npy", logits_of(model, job["ids"], job["decode"]))
        heads = [[layer.self_attn.n_heads, layer.self_attn.n_kv_heads] for layer in model.layers]
        Path(out + ".json").write_text(json.dumps({"size": group.size(), "heads": heads}))


if __name__ == "__main__":
    main(sys.argv[1])

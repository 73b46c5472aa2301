"""One generate request from its start to its end: state, prompt -> cache -> prefill -> sampling step -> channels
-> token events -> cache give-back -> stats; driven alone (solo.py) or in the batch (batcher.py)."""

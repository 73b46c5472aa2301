"""The world of a worker with several ranks, as ``ready``, ``load`` and ``status`` report it."""

from typing import Literal, Optional

from msgspec import Meta, Struct
from typing_extensions import Annotated


def doc(t, text: str):
    """``t`` with a meaning: it appears in PROTOCOL.md's tables and in the JSON Schema."""
    return Annotated[t, Meta(description=text)]


class RankInfo(Struct, omit_defaults=True, kw_only=True):
    rank: doc(int, "0 is the rank that reads stdin and writes stdout")
    host: doc(str, "the rank's host name")
    pid: doc(int, "the rank's process id on its host")
    memory_bytes: doc(int, "the rank's memory for the model: its GPU's, else its machine's")
    weights_bytes: doc(Optional[int], "load, status: the bytes of the model's weights this rank holds") = None


class Ranks(Struct, omit_defaults=True, kw_only=True):
    size: doc(int, "how many ranks run the model")
    backend: doc(str, "mx.distributed's backend: ring or nccl")
    parallel: doc(Optional[Literal["tensor", "pipeline"]], "load, status: how the loaded model is split") = None
    ranks: doc(list[RankInfo], "one per rank, in rank order")

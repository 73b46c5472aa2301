"""The KV memory ledger as ``status`` reports it (PROTOCOL.md, Concurrency: Memory)."""

from msgspec import Struct

from .ranks import doc


class KvMemory(Struct, kw_only=True):
    ceiling: doc(int, "options.kv_memory, or its default, in bytes")
    reserved: doc(int, "KV bytes the running generate requests have reserved (the rows of a batch count at "
                  "its longest row's size: the batch pads them to it)")
    free: doc(int, "ceiling - reserved (never below 0)")

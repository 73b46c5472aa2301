"""asyncio client for the mlx-worker protocol: the supported one lives in the package, ``openai_server/client.py``
(the OpenAI-compatible server hosts the worker through it); this name is kept for the examples beside it.

    async with AsyncWorker() as w:
        await w.load(path)
        async for ev in w.generate({"text": "hi"}, {"max_tokens": 20}): ...
"""

from openai_server.client import TERMINAL, AsyncWorker, WorkerError  # noqa: F401

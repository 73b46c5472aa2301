"""An OpenAI-compatible HTTP server that is a host of the worker (``mlx-worker-serve``, README: "From an OpenAI
client"): it spawns ``python -m worker`` and speaks PROTOCOL.md to it.

client.py     the asyncio client of the worker (the supported Python host; host_examples re-export it)
requests.py   OpenAI request bodies -> the worker's generate
responses.py  the worker's events -> OpenAI responses and stream chunks
errors.py     OpenAI's error shape; the worker's error codes as HTTP statuses
app.py        the Starlette app: endpoints, streaming, cancel on disconnect, restart
__main__.py   the command line (uvicorn)
"""

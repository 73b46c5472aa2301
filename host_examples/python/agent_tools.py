"""A two-tool agent loop over the protocol: the model calls tools, the host runs them, the results go
back into the conversation, until the model answers.

    python host_examples/python/agent_tools.py --model DIR [--question "..."] [--steps 4]

The first turn uses ``tool_choice: "required"`` (a small model such as SmolLM2-135M rarely decides to call a
tool on its own; the worker then constrains the output to one valid call), the later ones ``"auto"``. Every
step prints what the worker said: the calls with their arguments, the cached tokens (a follow-up reuses
the whole earlier conversation, the call included), and the final answer.
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_client import AsyncWorker  # noqa: E402

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]}},
            "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "to_fahrenheit", "description": "Convert a temperature from Celsius to Fahrenheit",
        "parameters": {"type": "object", "properties": {
            "celsius": {"type": "integer", "minimum": -60, "maximum": 60}},
            "required": ["celsius"], "additionalProperties": False}}},
]
WEATHER = {"Paris": 21, "London": 15, "Tokyo": 26}


def run_tool(name: str, args: dict) -> str:
    """The host's side of a call: plain Python, nothing from the worker."""
    if name == "get_weather":
        return json.dumps({"city": args["city"], "celsius": WEATHER[args["city"]], "sky": "clear"})
    if name == "to_fahrenheit":
        return json.dumps({"fahrenheit": round(args["celsius"] * 9 / 5 + 32, 1)})
    return json.dumps({"error": f"unknown tool {name}"})


async def agent(model: str, question: str, steps: int, max_tokens: int) -> dict:
    async with AsyncWorker() as w:
        info = await w.load(model)
        m = info["model"]
        print(f"model {Path(m['path']).name}: tool format {m.get('tool_parser')} ({m.get('tool_prompt')})")
        messages = [{"role": "user", "content": question}]
        for step in range(steps):
            choice = "required" if step == 0 else "auto"
            done, stats = None, None
            async for ev in w.chat(messages, tools=TOOLS, tool_choice=choice, params={"max_tokens": max_tokens},
                                   cache_key="agent"):
                if ev["type"] == "tool_call":
                    f = ev["call"]["function"]
                    print(f"step {step}: call {f['name']}({f['arguments']})")
                elif ev["type"] == "stats":
                    stats = ev
                elif ev["type"] in ("done", "error"):
                    done = ev
            if done["type"] == "error":
                raise SystemExit(f"{done['code']}: {done['message']}")
            print(f"step {step}: {done['stop_reason']}, {stats['cached_tokens']} of {stats['prompt_tokens']} "
                  f"prompt tokens from the cache")
            if not done.get("tool_calls"):
                print(f"answer: {done['text'].strip()}")
                return {"steps": step + 1, "answer": done["text"], "messages": messages}
            messages.append({"role": "assistant", "content": done["text"], "tool_calls": done["tool_calls"]})
            for call in done["tool_calls"]:
                result = run_tool(call["function"]["name"], json.loads(call["function"]["arguments"]))
                print(f"step {step}: {call['function']['name']} -> {result}")
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        print("no answer within the step limit")
        return {"steps": steps, "answer": None, "messages": messages}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--question", default="What is the weather in Paris, in Fahrenheit?")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    args = ap.parse_args()
    asyncio.run(agent(args.model, args.question, args.steps, args.max_tokens))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""JSON Schema of every message, generated from the Structs.

``python -m worker.protocol.schema`` prints it; ``schema/protocol.schema.json`` is the committed
copy, and a test fails when it is stale.
"""

import json
import sys

import msgspec

from .messages import PROTOCOL_VERSION, AnyEvent, AnyRequest


def build_schema() -> dict:
    """msgspec's schema, made as strict as the worker: standard keywords only, ``seq`` required,
    a prompt with exactly one of text/tokens/messages, logit_bias keys that are token ids."""
    (request, event), components = msgspec.json.schema_components(
        [AnyRequest, AnyEvent], ref_template="#/$defs/{name}"
    )
    request, event, components = (_strip_discriminator(x) for x in (request, event, components))
    for cls in AnyEvent.__args__:
        required = components[cls.__name__].setdefault("required", [])
        for name in ("seq", "id"):
            if name not in required:
                required.append(name)
    components["Prompt"]["oneOf"] = [
        {"required": [name], "properties": {name: components["Prompt"]["properties"][name]["anyOf"][0]}}
        for name in ("text", "tokens", "messages")]
    components["GenerateParams"]["properties"]["logit_bias"]["propertyNames"] = {"pattern": "^[0-9]+$"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"mlx-worker protocol {PROTOCOL_VERSION}",
        "description": "One JSON object per line. Requests go to the worker's stdin, events come from its stdout.",
        "$defs": {"Request": request, "Event": event, **components},
        "oneOf": [{"$ref": "#/$defs/Request"}, {"$ref": "#/$defs/Event"}],
    }


def _strip_discriminator(node):
    """OpenAPI's ``discriminator`` is not JSON Schema: drop it (the ``type`` const already decides)."""
    if isinstance(node, dict):
        return {k: _strip_discriminator(v) for k, v in node.items() if k != "discriminator"}
    if isinstance(node, list):
        return [_strip_discriminator(v) for v in node]
    return node


def schema_text() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_text())

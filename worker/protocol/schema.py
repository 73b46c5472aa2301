"""JSON Schema of every message, generated from the Structs.

``python -m worker.protocol.schema`` prints it; ``schema/protocol.schema.json`` is the committed
copy, and a test fails when it is stale.
"""

import json
import sys

import msgspec

from .messages import PROTOCOL_VERSION, AnyEvent, AnyRequest


def build_schema() -> dict:
    (request, event), components = msgspec.json.schema_components(
        [AnyRequest, AnyEvent], ref_template="#/$defs/{name}"
    )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": f"mlx-worker protocol {PROTOCOL_VERSION}",
        "description": "One JSON object per line. Requests go to the worker's stdin, events come from its stdout.",
        "$defs": {"Request": request, "Event": event, **components},
        "oneOf": [{"$ref": "#/$defs/Request"}, {"$ref": "#/$defs/Event"}],
    }


def schema_text() -> str:
    return json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    sys.stdout.write(schema_text())

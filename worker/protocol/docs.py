"""The generated part of PROTOCOL.md: one table per message, and the error codes, from the Structs.

``python -m worker.protocol.docs --write`` refreshes PROTOCOL.md (between the GENERATED markers)
and schema/protocol.schema.json; a test fails when either is stale.
"""

import json
import sys
from pathlib import Path

import msgspec.inspect as mi

from .errors import CODES
from .messages import AnyEvent, AnyRequest, GenerateParams, LoadOptions, Message, ModelInfo, Prompt
from .messages import AudioPart, CacheStats, KvMemory, DeviceInfo, ImagePart, ImageUrl, ImageUrlPart, Limits, TextPart
from .messages import FunctionCall, FunctionDef, NamedToolChoice, TokenLogprob, Tool, ToolCall, ToolChoiceFunction
from .messages import TopLogprob
from .ranks import RankInfo, Ranks
from .schema import schema_text

BEGIN, END = "<!-- BEGIN GENERATED: python -m worker.protocol.docs --write -->", "<!-- END GENERATED -->"
ROOT = Path(__file__).resolve().parents[2]


def _meaning(t) -> str:
    if isinstance(t, mi.Metadata):
        return (t.extra_json_schema or {}).get("description") or _meaning(t.type)
    return ""


def _type(t) -> str:
    if isinstance(t, mi.Metadata):
        return _type(t.type)
    if isinstance(t, mi.UnionType):
        return " \\| ".join(_type(x) for x in t.types)
    if isinstance(t, mi.NoneType):
        return "null"
    if isinstance(t, mi.LiteralType):
        return " \\| ".join(f'`"{v}"`' if isinstance(v, str) else f"`{v}`" for v in t.values)
    if isinstance(t, (mi.ListType,)):
        return f"array of {_type(t.item_type)}"
    if isinstance(t, mi.DictType):
        return "object"
    if isinstance(t, mi.StructType):
        return f"[{t.cls.__name__}](#{t.cls.__name__.lower()})"
    names = {mi.IntType: "integer", mi.FloatType: "number", mi.StrType: "string",
             mi.BoolType: "boolean", mi.AnyType: "any"}
    base = names.get(type(t), type(t).__name__)
    bounds = []
    for attr, sym in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<"),
                      ("min_length", "min length "), ("max_length", "max length ")):
        v = getattr(t, attr, None)
        if v is not None:
            bounds.append(f"{sym}{v}")
    return base + (f" ({', '.join(bounds)})" if bounds else "")


def _table(cls) -> str:
    info = mi.type_info(cls)
    rows = ["| field | type | required / default | meaning |", "|---|---|---|---|"]
    tag = cls.__struct_config__.tag
    if tag is not None:
        rows.append(f'| `type` | `"{tag}"` | required | |')
    for f in info.fields:
        if f.required:
            req = "required"
        elif f.default is not mi.NODEFAULT:
            try:
                req = f"default `{json.dumps(f.default)}`"
            except TypeError:
                req = f"default `{f.default!r}`"
        else:
            req = "optional"
        meaning = _meaning(f.type).replace("|", "\\|")
        rows.append(f"| `{f.encode_name}` | {_type(f.type)} | {req} | {meaning} |")
    return "\n".join(rows)


def generated_markdown() -> str:
    parts = [BEGIN, "", "### Requests", ""]
    for cls in AnyRequest.__args__:
        parts += [f"#### {cls.__name__}", "", _table(cls), ""]
    parts += ["### Request parts", ""]
    for cls in (LoadOptions, Prompt, Message, TextPart, ImagePart, ImageUrlPart, ImageUrl, AudioPart, Tool,
                FunctionDef, NamedToolChoice, ToolChoiceFunction, ToolCall, FunctionCall, GenerateParams):
        parts += [f"#### {cls.__name__}", "", _table(cls), ""]
    parts += ["### Events", "", "Every event also carries `seq` (integer, increasing by one per line).", ""]
    for cls in AnyEvent.__args__:
        parts += [f"#### {cls.__name__}", "", _table(cls), ""]
    parts += ["### Event parts", ""]
    for cls in (ModelInfo, DeviceInfo, Limits, CacheStats, KvMemory, TokenLogprob, TopLogprob, Ranks, RankInfo):
        parts += [f"#### {cls.__name__}", "", _table(cls), ""]
    parts += ["### Error codes", "", "| code | number |", "|---|---|"]
    parts += [f"| `{c}` | {n} |" for c, n in CODES.items()]
    parts += ["", END]
    return "\n".join(parts)


def refresh(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + generated_markdown() + tail


def main(argv) -> int:
    doc = ROOT / "PROTOCOL.md"
    schema = ROOT / "schema" / "protocol.schema.json"
    if "--write" in argv:
        doc.write_text(refresh(doc.read_text(encoding="utf-8")), encoding="utf-8")
        schema.parent.mkdir(exist_ok=True)
        schema.write_text(schema_text(), encoding="utf-8")
        return 0
    sys.stdout.write(generated_markdown() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

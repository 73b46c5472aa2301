"""Tiny fixtures whose chat templates render tools (and thinking): a Qwen3 / Hermes-style ChatML one
(``<tool_call>`` JSON, ``<think>`` markers; mlx-lm picks its ``json_tools`` parser) and a Mistral-style
one (``[TOOL_CALLS]`` JSON list; mlx-lm's ``mistral`` parser). Built like tests/support/fixtures.py's (the
qwen2 / llama models with their own tokenizers); ``drive_marker`` makes a marker token the model's
choice wherever it would pick a given token, so a random-weight model emits it mid-generation."""

from pathlib import Path

from tests.support import fixtures as F

# Qwen3's template, reduced: tools in the system turn, calls as <tool_call> JSON, results as user turns
# with <tool_response>, thinking on unless enable_thinking is false. ``think_open`` variant: the
# generation prompt opens the thinking block (as DeepSeek-R1-style templates do).
_HERMES = (
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if messages[0]['role'] == 'system' -%}{{- messages[0]['content'] + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' -}}"
    "{%- elif messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' + (message['content'] or '') -}}"
    "{%- for tool_call in message['tool_calls'] or [] -%}"
    "{%- if tool_call['function'] is defined -%}{%- set tool_call = tool_call['function'] -%}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + "
    "(tool_call.arguments | tojson) + '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- elif think_open -%}{{- '<think>\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)

_MISTRAL = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if loop.last and tools -%}{{- '[AVAILABLE_TOOLS]' + (tools | tojson) + '[/AVAILABLE_TOOLS]' -}}{%- endif -%}"
    "{{- '[INST]' + message['content'] + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['tool_calls'] -%}{{- '[TOOL_CALLS][' -}}"
    "{%- for tc in message['tool_calls'] -%}"
    "{%- set f = tc['function'] if tc['function'] is defined else tc -%}"
    "{{- '{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}' -}}"
    "{%- if not loop.last -%}{{- ', ' -}}{%- endif -%}"
    "{%- endfor -%}{{- ']' -}}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{{- eos_token -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS]{\"content\": ' + (message['content'] | tojson) + '}[/TOOL_RESULTS]' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

F.TOKENIZER_SPECS["hermes"] = dict(
    F.TOKENIZER_SPECS["qwen2"], template=_HERMES, tokenizer_class="PreTrainedTokenizerFast",
    specials=F.TOKENIZER_SPECS["qwen2"]["specials"] + ["<tool_call>", "</tool_call>", "<think>", "</think>"])
F.MODEL_SPECS["hermes"] = F.MODEL_SPECS["qwen2"]
F.INIT_SCALES["hermes"] = F.INIT_SCALES["qwen2"]

F.TOKENIZER_SPECS["mistral"] = dict(
    specials=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
              "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
    bos="<s>", eos="</s>", pad="<unk>", eos_tokens=["</s>"], add_bos=True, template=_MISTRAL,
    tokenizer_class="PreTrainedTokenizerFast")
F.MODEL_SPECS["mistral"] = F.MODEL_SPECS["llama"]
F.INIT_SCALES["mistral"] = F.INIT_SCALES["llama"]

TOOL_FAMILIES = ("hermes", "mistral")


def tool_fixture_dir(family: str, root) -> Path:
    return F.build_once(Path(root) / f"{family}-seed0", lambda tmp: F.build_fixture(family, tmp, 0))


def drive_marker(src: Path, dst: Path, marker: str, instead_of: int) -> Path:
    """A copy of ``src`` whose output row for ``marker`` is 1.5x the row of token ``instead_of``: greedy
    decoding then emits the marker wherever it would have emitted that token."""
    import shutil

    import mlx.core as mx
    from transformers import AutoTokenizer

    if not (dst / "model.safetensors").exists():
        shutil.copytree(src, dst, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(str(dst))
        w = dict(mx.load(str(dst / "model.safetensors")))
        row = tok.convert_tokens_to_ids(marker)
        head = w["lm_head.weight"]
        w["lm_head.weight"] = head.at[row].add(head[instead_of] * 1.5 - head[row])
        mx.save_safetensors(str(dst / "model.safetensors"), w, metadata={"format": "mlx"})
    return dst

#!/usr/bin/env bash
# Summarize a text file with the worker:  MODEL=/model/dir summarize.sh FILE   (prints the summary)
set -euo pipefail
FILE="${1:?usage: MODEL=dir summarize.sh FILE}"; : "${MODEL:?set MODEL to a model directory}"
MAX_TOKENS="${MAX_TOKENS:-200}"
source "$(dirname "$0")/_worker.sh"
wk_send "$(jq -nc --arg p "$MODEL" '{type:"load",id:"load",model_path:$p}')"
ev=$(wk_wait load); [ "$(jq -r .type <<<"$ev")" = done ] || { echo "load failed: $(jq -r '.code+": "+.message' <<<"$ev")" >&2; exit 1; }
wk_send "$(jq -nc --rawfile doc "$FILE" --argjson n "$MAX_TOKENS" \
  '{type:"generate",id:"sum",prompt:{messages:[{role:"system",content:"Summarize the user text in a few sentences."},{role:"user",content:$doc}]},params:{max_tokens:$n}}')"
ev=$(wk_wait sum)
wk_close
if [ "$(jq -r .type <<<"$ev")" = error ]; then echo "error: $(jq -r '.code+": "+.message' <<<"$ev")" >&2; exit 1; fi
jq -j .text <<<"$ev"; echo

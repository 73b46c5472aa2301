#!/usr/bin/env bash
# Ask the worker to describe an image:  MODEL=/model/dir describe_image.sh IMAGE
# Protocol 1.0 accepts only {"type":"text"} message parts; the image part is sent anyway so this script
# starts working once a vision add-on accepts it. Until then the worker answers invalid_params and we exit 3.
set -euo pipefail
IMAGE="${1:?usage: MODEL=dir describe_image.sh IMAGE}"; : "${MODEL:?set MODEL to a model directory}"
[ -r "$IMAGE" ] || { echo "cannot read $IMAGE" >&2; exit 2; }
source "$(dirname "$0")/_worker.sh"
wk_send "$(jq -nc --arg p "$MODEL" '{type:"load",id:"load",model_path:$p}')"
ev=$(wk_wait load); [ "$(jq -r .type <<<"$ev")" = done ] || { echo "load failed: $(jq -r '.code+": "+.message' <<<"$ev")" >&2; exit 1; }
IMG="$(cd "$(dirname "$IMAGE")" && pwd)/$(basename "$IMAGE")"
wk_send "$(jq -nc --arg img "$IMG" '{type:"generate",id:"img",prompt:{messages:[{role:"user",content:[{type:"image",image:$img},{type:"text",text:"Describe this image."}]}]},params:{max_tokens:200}}')"
ev=$(wk_wait img)
wk_close
if [ "$(jq -r .type <<<"$ev")" = error ]; then
  code=$(jq -r .code <<<"$ev")
  if [ "$code" = invalid_params ]; then
    echo "error: this worker does not accept image message parts (no vision add-on; protocol 1.0 takes text parts only)." >&2
    echo "worker said: $code: $(jq -r .message <<<"$ev")" >&2
    exit 3
  fi
  echo "error: $code: $(jq -r .message <<<"$ev")" >&2; exit 1
fi
jq -j .text <<<"$ev"; echo

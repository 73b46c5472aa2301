# Sourced helper: starts the worker as a coprocess; wk_send JSON; wk_wait ID prints that id's terminal event.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORKER_CMD="${WORKER_CMD:-$ROOT/.venv/bin/python -m worker}"
command -v jq >/dev/null || { echo "jq is required (apt-get install -y jq)" >&2; exit 2; }
coproc WK { cd "$ROOT" && exec $WORKER_CMD 2>"${WORKER_LOG:-/dev/null}"; }
IFS= read -r -t 120 READY <&"${WK[0]}" || { echo "worker did not start" >&2; exit 1; }
wk_send() { printf '%s\n' "$1" >&"${WK[1]}"; }
wk_wait() {  # print the terminal event of id $1; token text goes to stderr if STREAM=1
  local line
  while IFS= read -r line <&"${WK[0]}"; do
    [ "$(jq -r .id <<<"$line")" = "$1" ] || continue
    case "$(jq -r .type <<<"$line")" in
      done|error) printf '%s\n' "$line"; return 0 ;;
    esac
  done
  echo "worker exited unexpectedly" >&2; return 1
}
wk_close() { exec {WK[1]}>&-; wait "$WK_PID" 2>/dev/null || true; }

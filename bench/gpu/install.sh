# On the GPU machine, in the repo root:  . bench/gpu/install.sh
# Installs the wheels that `python -m bench.gpu.fetch_wheels` put in bench/gpu/wheels/part1 and part2 (each
# carried by its own call) into bench/gpu/wheels/site, once per machine, then puts that folder and the repo on
# PYTHONPATH. Sourced, so the exports stay in the calling shell; returns non-zero when something is missing.
_w=bench/gpu/wheels
if [ ! -d "$_w/site/mlx" ]; then
  for _p1 in "$_w"/part1/*.part1; do
    [ -e "$_p1" ] || { echo "install.sh: no $_w/part1 here: carry it (bench/README.md)" >&2; return 1; }
    _name=$(basename "$_p1" .part1)
    [ -e "$_w/part2/$_name.part2" ] || { echo "install.sh: no $_w/part2/$_name.part2 here: carry it" >&2; return 1; }
    cat "$_p1" "$_w/part2/$_name.part2" > "$_w/$_name"
  done
  (cd "$_w" && sha256sum --quiet -c part1/SHA256SUMS) || { echo "install.sh: a wheel's sha256 differs" >&2; return 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$_w/site" \
    "$_w"/part1/*.whl "$_w"/*.whl || return 1
  rm -f "$_w"/*.whl
fi
export PYTHONPATH="$PWD/$_w/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset _w _p1 _name

#!/usr/bin/env bash
# Checks docs/openapi.json with tools that share no code with the server, as CI does:
# 1. validates it as OpenAPI 3.1 (openapi-spec-validator);
# 2. generates a Python client from it (openapi-python-client), into the target directory;
# 3. builds soloist-server (or takes $SOLOIST_SERVER_BIN), starts it on a fresh SQLite file on a
#    free port, runs example.py with the generated client against it, and stops it.
# Idempotent: the virtualenv (target/python-client/venv) is kept between runs and reinstalled
# only when requirements.txt changes; the client is generated anew each time.
set -euo pipefail
cd "$(dirname "$0")/../.."

target="$(realpath -m "${CARGO_TARGET_DIR:-target}")"
work="$target/python-client"
venv="$work/venv"
mkdir -p "$work"

requirements=examples/python_client/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi
# The generator runs its formatter (ruff, installed beside it) from PATH.
export PATH="$venv/bin:$PATH"

echo "-- validate docs/openapi.json as OpenAPI 3.1"
"$venv/bin/openapi-spec-validator" --schema 3.1 docs/openapi.json

echo "-- generate a Python client from it"
rm -rf "$work/soloist_client"
"$venv/bin/openapi-python-client" generate --path docs/openapi.json --meta none \
  --config examples/python_client/generator.yaml --output-path "$work/soloist_client" \
  --fail-on-warning
test -f "$work/soloist_client/client.py"

echo "-- run the example against a server"
# SOLOIST_SERVER_BIN: a binary built already (CI passes the one its tests ran).
server_bin="${SOLOIST_SERVER_BIN:-}"
if [ -z "$server_bin" ]; then
  cargo build --quiet -p soloist-server --bin soloist-server
  server_bin="$target/debug/soloist-server"
fi
data="$(mktemp -d)"
log="$data/server.out"
: >"$log"
"$server_bin" --listen 127.0.0.1:0 --database-url "sqlite://$data/chat.db" \
  >"$log" 2>"$data/server.err" &
server=$!
stop() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$data"
}
trap stop EXIT
base=""
for _ in $(seq 1 100); do
  base="$(sed -n 's/^listening on //p' "$log" | head -n 1)"
  [ -n "$base" ] && break
  kill -0 "$server" 2>/dev/null || { cat "$data/server.err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$base" ] || { echo "soloist-server did not start" >&2; cat "$data/server.err" >&2; exit 1; }
PYTHONPATH="$work" "$venv/bin/python" examples/python_client/example.py "$base"

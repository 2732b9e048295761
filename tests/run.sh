#!/usr/bin/env bash
# The whole test suite, on a fresh Debian or Ubuntu machine with Rust:
#
#   tests/run.sh
#
# 1. installs what the tests run and is missing (only then; with sudo when
#    not root): cmake and a C compiler (Pingora's build), pebble (ACME
#    tests), redis-server (cluster tests), curl (HTTP/2 client), nginx and
#    wrk (the soak's upstream and load), python3 with venv;
# 2. makes the project's virtualenv `.venv` with the official Python
#    clients the tests drive the gateway with (tests/clients/
#    requirements.txt), when they are missing;
# 3. runs `cargo test` (arguments after `--` go to it: `tests/run.sh --
#    --test https` runs one file);
# 4. runs the soak test's short form (`PROFILE=debug tests/soak.sh 60`)
#    unless arguments were given or SOAK=0.
#
# `tests/run.sh --lint` also checks formatting and lints (`cargo fmt
# --check`, `cargo clippy --all-targets -- -D warnings`) before the tests:
# that is what `.ci/run` runs. Prints what it installs; exits non-zero when
# any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[tests/run.sh] %s\n' "$*" >&2; }

have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/bin/$1" ] || [ -x "/usr/sbin/$1" ]; }

need=()
have cmake || need+=(cmake)
have cc || need+=(gcc)
have c++ || need+=(g++)
have pebble || need+=(pebble)
have redis-server || need+=(redis-server)
have curl || need+=(curl)
have nginx || need+=(nginx)
have wrk || need+=(wrk)
have python3 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  say "installing: ${need[*]}"
  command -v apt-get >/dev/null 2>&1 || {
    say "apt-get not found: install ${need[*]} with your package manager, then run this again"
    exit 1
  }
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The Python clients, pinned, in the project's own virtualenv (the tests
# find it at .venv; AGW_TEST_PYTHON overrides).
if ! .venv/bin/python -c 'import ollama, openai' >/dev/null 2>&1; then
  say "installing the Python clients into .venv (tests/clients/requirements.txt)"
  python3 -m venv .venv
  .venv/bin/pip install -q -r tests/clients/requirements.txt
fi

lint=0
if [ "${1:-}" = --lint ]; then
  lint=1
  shift
fi
args=()
if [ "${1:-}" = -- ]; then
  shift
  args=("$@")
fi

if [ $lint = 1 ]; then
  say "cargo fmt --check; cargo clippy"
  cargo fmt --all -- --check
  cargo clippy --all-targets --locked -- -D warnings
fi

say "cargo test ${args[*]}"
cargo test --locked "${args[@]}"

if [ ${#args[@]} -eq 0 ] && [ "${SOAK:-1}" != 0 ]; then
  say "soak, short form: PROFILE=debug tests/soak.sh 60"
  PROFILE=debug tests/soak.sh 60
fi

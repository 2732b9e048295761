#!/usr/bin/env bash
# The whole test suite, on a fresh Debian or Ubuntu machine with Rust:
#
#   tests/run.sh
#
# 1. installs what the tests run and is missing (only then; with sudo when
#    not root): cmake, make and a C compiler (Pingora's build), pebble (ACME
#    tests), redis-server (cluster tests), curl (HTTP/2 client), nginx and
#    wrk (the soak's upstream and load), chromium (the status page test),
#    python3 with venv. Their system
#    services are not started (the tests start their own on free ports);
# 2. makes the project's virtualenv `.venv` with the official Python
#    clients the tests drive the gateway with (tests/clients/
#    requirements.txt), when they are missing;
# 3. runs `cargo test` (every test file, even after one fails; arguments
#    after `--` go to it: `tests/run.sh -- --test https` runs one file);
# 4. runs the soak test's short form (`PROFILE=debug tests/soak.sh 60`)
#    unless arguments were given or SOAK=0.
#
# `tests/run.sh --lint` also checks formatting and lints (`cargo fmt
# --check`, `cargo clippy --all-targets -- -D warnings`) before the tests:
# that is what `.ci/run` runs. A step that fails prints a cargo-style
# `test result: FAILED` line naming it (so a summary of those lines counts
# it) and the script exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
# nginx and redis-server live in /usr/sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { printf '[tests/run.sh] %s\n' "$*" >&2; }

# Reports a failed step the way cargo reports a failed test binary.
failed() {
  echo "test result: FAILED. 0 passed; 1 failed; (tests/run.sh step: $1)"
  exit 1
}

usage() {
  echo "usage: tests/run.sh [--lint] [-- CARGO_TEST_ARGS...]" >&2
  exit 2
}

lint=0
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --lint) lint=1; shift ;;
    --) shift; args=("$@"); break ;;
    *) usage ;;
  esac
done

have() { command -v "$1" >/dev/null 2>&1; }

need=()
have cmake || need+=(cmake)
have make || need+=(make)
have cc || need+=(gcc)
have c++ || need+=(g++)
have pebble || need+=(pebble)
have redis-server || need+=(redis-server)
have curl || need+=(curl)
have nginx || need+=(nginx)
have wrk || need+=(wrk)
# tests/status_page.rs renders the status page in headless Chromium.
have chromium || need+=(chromium)
have python3 || need+=(python3)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  say "installing: ${need[*]}"
  have apt-get || {
    say "apt-get not found: install ${need[*]} with your package manager, then run this again"
    failed "install ${need[*]}"
  }
  sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  # Packages only: no service starts (nginx would take port 80, and its
  # install would fail where that is in use). policy-rc.d is Debian's way.
  policy=/usr/sbin/policy-rc.d
  made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | "${sudo[@]}" tee "$policy" >/dev/null
    "${sudo[@]}" chmod 755 "$policy"
    made_policy=1
  fi
  status=0
  { "${sudo[@]}" apt-get update -qq && "${sudo[@]}" apt-get install -y -qq "${need[@]}" >/dev/null; } || status=$?
  [ $made_policy = 0 ] || "${sudo[@]}" rm -f "$policy"
  [ $status = 0 ] || failed "apt-get install ${need[*]}"
fi

# The Python clients, pinned, in the project's own virtualenv (the tests
# find it at .venv; AGW_TEST_PYTHON overrides).
if ! .venv/bin/python -c 'import ollama, openai, anthropic' >/dev/null 2>&1; then
  say "installing the Python clients into .venv (tests/clients/requirements.txt)"
  { python3 -m venv .venv && .venv/bin/pip install -q -r tests/clients/requirements.txt; } ||
    failed "the Python clients"
fi

if [ $lint = 1 ]; then
  say "cargo fmt --check; cargo clippy"
  cargo fmt --all -- --check || failed "cargo fmt --check"
  cargo clippy --all-targets --locked -- -D warnings || failed "cargo clippy"
fi

say "cargo test ${args[*]}"
status=0
cargo test --locked --no-fail-fast "${args[@]}" || status=$?

if [ ${#args[@]} -eq 0 ] && [ "${SOAK:-1}" != 0 ]; then
  say "soak, short form: PROFILE=debug tests/soak.sh 60"
  PROFILE=debug tests/soak.sh 60 || failed "the soak (tests/soak.sh 60)"
  echo "test result: ok. 1 passed; 0 failed; (tests/run.sh step: the soak)"
fi
exit $status

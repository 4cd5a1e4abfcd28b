# shellcheck shell=bash
# Shared by scripts/run, scripts/test and scripts/bench: find or install what
# eventwire needs on this machine. Source it from the repository root.

say() { printf '%s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

is_root() { [ "$(id -u)" = 0 ]; }

apt_install() {  # apt_install PKG... ; as root on Debian/Ubuntu only
  if is_root && command -v apt-get >/dev/null 2>&1; then
    say "installing $* with apt-get"
    if [ -z "${EVENTWIRE_APT_UPDATED:-}" ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || true
      export EVENTWIRE_APT_UPDATED=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
    return 0
  fi
  return 1
}

find_python() {  # prints a python >= 3.11
  local py
  for py in "${PYTHON:-}" python3 python3.13 python3.12 python3.11; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 \
      && "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  return 1
}

ensure_venv() {  # creates .venv and installs eventwire with its dev extras when pyproject changes
  local py stamp want
  if [ ! -x .venv/bin/python ]; then
    py=$(find_python) || { apt_install python3 python3-venv && py=$(find_python); } \
      || die "Python 3.11 or newer is needed (Debian/Ubuntu: apt-get install python3 python3-venv)"
    if ! "$py" -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      apt_install python3-venv || die "python3 -m venv failed: install python3-venv"
      "$py" -m venv .venv
    fi
  fi
  stamp=.venv/.eventwire-installed
  want=$(cat pyproject.toml | cksum)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    say "installing eventwire and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip >&2 2>/dev/null || true
    .venv/bin/python -m pip install -q -e '.[dev]' >&2 || die "pip install failed"
    printf '%s' "$want" >"$stamp"
  fi
}

ensure_redis_server() {  # redis-server 7 on PATH, installed with apt-get if missing
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server || die "redis-server is missing: install Redis 7 \
(Debian/Ubuntu: sudo apt-get install redis-server; macOS: brew install redis)"
    # Debian's package starts a system service on 6379; eventwire never uses it.
  fi
  local major
  major=$(redis-server --version | sed -n 's/.*v=\([0-9]*\).*/\1/p')
  [ "${major:-0}" -ge 7 ] || die "redis-server $major found; Redis 7 or newer is needed"
}

ensure_chromium() {  # Debian's Chromium for the browser tests, installed with apt-get if missing
  [ -x /usr/bin/chromium ] && return 0
  apt_install chromium && return 0
  say "warning: /usr/bin/chromium is missing, so the browser tests will be skipped \
(Debian/Ubuntu: sudo apt-get install chromium)"
}

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

wait_port() {  # wait_port PORT SECONDS
  local i
  for i in $(seq $(( $2 * 10 ))); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

#!/usr/bin/env bash
# The Python 3.12 environment of the second CI leg (`make test-compat`, issue #20): megatron-core 0.19.2 and
# torch 2.13.0 with the pins of constraints-py312.txt. Prints the environment's directory on stdout (the only
# line there; progress goes to stderr).
#
# It lives OUTSIDE the clone, cached per machine, so that a repeated CI run downloads nothing:
#     ${DQO_COMPAT_CACHE:-$HOME/.cache/dqo-megatron}/py312-<key>
# <key> = the first 12 hex digits of sha256(constraints-py312.txt, the dependencies and the `test` extra of
# pyproject.toml, the interpreter's version): a change to any of them builds a new directory.
# Only the dependencies are installed, never dqo-megatron itself (one environment serves every clone on the
# machine): run the tests with PYTHONPATH=<clone>.
#
# A build writes the stamp file .dqo-compat-complete LAST; a directory without it (a run killed mid-build) is
# removed and built again, never used. A lock file (<dir>.lock, flock) keeps two runs from building the same
# directory at once. Directories of other keys are left in place and listed on stderr (several GB each);
# DQO_COMPAT_PRUNE=1 removes the ones no build holds (not while another clone's leg runs tests with one).
#
# Python 3.12: $DQO_PYTHON312 if set, else the first that runs of python3.12 on PATH (a pyenv shim fails
# when 3.12 is not selected), ${PYENV_ROOT:-~/.pyenv}/versions/3.12*/bin/python3.12, /usr/local/bin, /usr/bin.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
constraints=$repo/constraints-py312.txt
cache=${DQO_COMPAT_CACHE:-$HOME/.cache/dqo-megatron}
stamp_name=.dqo-compat-complete

log() { echo "compat_env: $*" >&2; }

find_python312() {
    local candidates=() c
    [ -n "${DQO_PYTHON312:-}" ] && candidates+=("$DQO_PYTHON312")
    c=$(command -v python3.12 || true)
    [ -n "$c" ] && candidates+=("$c")
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -x "$c" ] && candidates+=("$c")
    done
    for c in "${candidates[@]}"; do
        if "$c" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1; then
            echo "$c"
            return 0
        fi
    done
    return 1
}

if ! py=$(find_python312); then
    log "no working Python 3.12 found (tried \$DQO_PYTHON312, python3.12 on PATH, pyenv's versions/3.12*, /usr/local/bin, /usr/bin); megatron-core >= 0.17 needs Python >= 3.12: install one (with venv) or set DQO_PYTHON312=/path/to/python3.12"
    exit 2
fi

# line 1: the key; then one requirement per line (pyproject's dependencies + the test extra)
mapfile -t lines < <("$py" - "$repo/pyproject.toml" "$constraints" <<'EOF'
import hashlib, platform, sys, tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
deps = list(project["dependencies"]) + list(project["optional-dependencies"]["test"])
with open(sys.argv[2], "rb") as f:
    constraints = f.read()
h = hashlib.sha256(constraints + b"\0" + "\n".join(deps).encode() + b"\0" + platform.python_version().encode())
print(h.hexdigest()[:12])
print("\n".join(deps))
EOF
)
key=${lines[0]:-}
[ ${#key} = 12 ] || { log "could not read $repo/pyproject.toml's dependencies with $py"; exit 2; }
deps=("${lines[@]:1}")
env_dir=$cache/py312-$key

mkdir -p "$cache"
exec 9>"$env_dir.lock"
flock 9

if [ -f "$env_dir/$stamp_name" ] && "$env_dir/bin/python" -c '' >/dev/null 2>&1; then
    log "reusing $env_dir"
else
    if [ -e "$env_dir" ]; then
        log "$env_dir is incomplete (no $stamp_name: a build was interrupted) or its interpreter is gone: rebuilding"
        rm -rf "$env_dir"
    fi
    log "building $env_dir with $py (torch 2.13.0 on Python 3.12 is a CUDA build: ~1.4 GB to download, ~5.4 GB on disk)"
    start=$(date +%s)
    trap 'log "building $env_dir failed (see above); it has no stamp, so the next run starts it again"' ERR
    # stdout carries only the directory (the Makefile reads it): everything else goes to stderr
    "$py" -m venv "$env_dir" >&2
    "$env_dir/bin/python" -m pip install -q -c "$constraints" torch==2.13.0 >&2
    "$env_dir/bin/python" -m pip install -q -c "$constraints" "${deps[@]}" >&2
    "$env_dir/bin/python" -m pip freeze > "$env_dir/FREEZE.txt"
    {
        echo "key $key"
        echo "python $py"
        echo "constraints $constraints"
        echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(($(date +%s) - start)) s"
    } > "$env_dir/$stamp_name.tmp"
    mv "$env_dir/$stamp_name.tmp" "$env_dir/$stamp_name"
    trap - ERR
    log "built $env_dir in $(($(date +%s) - start)) s"
fi

for other in "$cache"/py312-*; do
    case $other in "$env_dir" | *.lock) continue ;; esac
    [ -d "$other" ] || continue
    if [ "${DQO_COMPAT_PRUNE:-0}" = 1 ] && flock -n "$other.lock" rm -rf "$other"; then
        rm -f "$other.lock"
        log "pruned $other (another key)"
    else
        log "left $other (another key, $(du -sh "$other" 2>/dev/null | cut -f1); DQO_COMPAT_PRUNE=1 removes it)"
    fi
done

echo "$env_dir"

#!/usr/bin/env bash
# Create or update a virtual environment for `make setup`, printing one line per phase with the
# seconds since set-up began, so that a first run never looks hung.
#
# uv (installed into the venv with pip) does the work when it can be had: it installs the whole
# stack in seconds where pip takes minutes. uv reads neither pip's configuration nor its torch cap,
# so torch comes from the machine's local wheel directory (pip's find-links) when one holds the
# pinned build; otherwise pip installs torch (as configured for this machine) and uv the rest.
# Without uv, pip does everything, printing a line per package.
#
# usage: scripts/setup-venv.sh VENV PYTHON CONSTRAINTS REQUIREMENT...
set -euo pipefail
venv=$1 python=$2 constraints=$3
shift 3
start=$(date +%s)
say() { printf '[setup %4ss] %s\n' "$(($(date +%s) - start))" "$*"; }
quiet_pip() { grep -v -e "is ignored: it is neither" -e "^Requirement already satisfied" || true; }

if [ ! -x "$venv/bin/python" ]; then
    say "creating $venv with $($python --version 2>&1)"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

torch_pin=""
for req in "$@"; do
    case $req in torch==*) torch_pin=${req#torch==} ;; esac
done
find_links=${PIP_FIND_LINKS:-$("${pip[@]}" config get global.find-links 2>/dev/null || true)}
local_torch=""
for dir in $find_links; do
    [ -n "$torch_pin" ] || break
    wheel=$(ls "$dir"/torch-"$torch_pin"[+-]*.whl 2>/dev/null | head -n 1 || true)
    if [ -n "$wheel" ]; then local_torch=$dir; break; fi
done

uv=""
if [ "${TWINKLE_SETUP_PIP:-0}" != 1 ]; then
    say "installing uv into $venv (set TWINKLE_SETUP_PIP=1 to use pip only)"
    if "${pip[@]}" install --quiet --progress-bar off uv 2>&1 | quiet_pip; then
        [ -x "$venv/bin/uv" ] && uv="$venv/bin/uv"
    fi
    [ -n "$uv" ] || say "uv is unavailable: falling back to pip (a few minutes, one line per package)"
fi

if [ -n "$uv" ]; then
    uv_args=(pip install -p "$venv/bin/python" -c "$constraints")
    if [ -n "$torch_pin" ] && [ -z "$local_torch" ]; then
        say "installing torch==$torch_pin with pip (no local wheel of it for uv)"
        "${pip[@]}" install --progress-bar off "torch==$torch_pin" 2>&1 | quiet_pip
    elif [ -n "$local_torch" ]; then
        uv_args+=(--find-links "$local_torch")
        say "torch==$torch_pin comes from the local wheel in $local_torch"
    fi
    say "installing $* with uv"
    # uv prints one '+ package==version' line per package; keep its summaries only
    "$uv" "${uv_args[@]}" "$@" 2>&1 | { grep -v -e '^ [+-] ' || true; }
else
    say "installing $* with pip"
    "${pip[@]}" install --progress-bar off -c "$constraints" "$@" 2>&1 | quiet_pip
fi
say "done"

#!/usr/bin/env bash
# Install the trainer's GPU dependencies into a Python that already has a CUDA torch, without
# ever replacing that torch (nor Transformer Engine, Apex, megatron-core, triton, numpy or the
# nvidia-* CUDA wheels already installed there).
#
#   bash tools/gpu_prepare.sh constraints                 # print the pins of what must stay
#   bash tools/gpu_prepare.sh install                     # from the package index
#   bash tools/gpu_prepare.sh install --find-links DIR    # offline: only the wheels in DIR
#   bash tools/gpu_prepare.sh download DIR [PYVER]        # here, with network: fetch megatron-core
#                                                         # for a machine without one (default 3.12)
#
# How: every installed distribution named above becomes a constraint `name==installed-version`
# (PEP 440 `==` with the local label, e.g. torch==2.11.0+cu130), and pip resolves
# requirements-gpu.txt under them: it keeps them or stops with a conflict naming the package;
# it cannot install another torch. `install` then installs this repository with --no-deps.
#
# Offline machines (the device machine of this workplace has torch but no network and no
# megatron-core): `download` fetches the megatron-core wheel (pure Python, a few MB) into DIR;
# carry DIR there and run `install --find-links DIR`, which installs only what DIR holds
# (megatron-core) under the same constraints. Transformer Engine cannot travel that way: its
# core wheel is ~180 MB and transformer_engine_torch is a source distribution compiled against
# the machine's torch. Without TE, tools/gpu_smoke.sh FAILS its TE row (by design).
#
# Environment: PYTHON (default: python3, or .venv/bin/python when it exists).
# Exit status: 0 installed / printed; 2 usage or a pip failure (one line saying which).
set -uo pipefail
cd "$(dirname "$0")/.."

die() { echo "gpu_prepare.sh: $*" >&2; exit 2; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Distributions that must never be replaced (normalised names; prefixes end with '-').
KEEP='torch torchvision torchaudio triton pytorch-triton numpy apex megatron-core flash-attn transformer-engine transformer-engine-torch transformer-engine-cu12 transformer-engine-cu13 nvidia-'

constraints() {
  "$PYTHON" - "$KEEP" <<'EOF' || die "cannot list the installed packages of $PYTHON"
import re, sys
from importlib import metadata
keep = sys.argv[1].split()
seen = {}
for dist in metadata.distributions():
    name = re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "")).lower()
    if not name or name in seen:
        continue
    if any(name == k or (k.endswith("-") and name.startswith(k)) for k in keep):
        seen[name] = dist.version
for name in sorted(seen):
    print(f"{name}=={seen[name]}")
EOF
}

case "${1:-}" in
  constraints)
    constraints
    ;;
  install)
    shift
    links=()
    if [ "${1:-}" = --find-links ]; then
      [ -d "${2:-}" ] || die "--find-links needs a directory of wheels"
      links=(--no-index --find-links "$2"); shift 2
    fi
    [ $# -eq 0 ] || die "unknown arguments: $* (see the header of tools/gpu_prepare.sh)"
    "$PYTHON" -c 'import torch' 2>/dev/null ||
      die "$PYTHON has no torch: install the CUDA torch first (or use an NVIDIA PyTorch container)"
    cfile=$(mktemp) || die "mktemp failed"
    trap 'rm -f "$cfile"' EXIT
    constraints >"$cfile"
    echo "gpu_prepare.sh: keeping $(tr '\n' ' ' <"$cfile")"
    if [ ${#links[@]} -gt 0 ]; then
      # offline: install what the directory holds (megatron-core), under the same constraints
      shopt -s nullglob
      wheels=("${links[2]}"/*.whl)
      [ ${#wheels[@]} -gt 0 ] || die "no wheels in ${links[2]}"
      "$PYTHON" -m pip install -q --no-build-isolation "${links[@]}" -c "$cfile" "${wheels[@]}" ||
        die "pip could not install the wheels of ${links[2]} without replacing a kept package (see pip's message above)"
    else
      "$PYTHON" -m pip install --no-build-isolation -c "$cfile" -r requirements-gpu.txt ||
        die "pip could not install requirements-gpu.txt without replacing a kept package (see pip's message above): drop the conflicting pin from a copy of requirements-gpu.txt if the installed version is supported"
    fi
    "$PYTHON" -m pip install -q --no-deps --no-build-isolation "${links[@]}" -e . ||
      die "pip could not install this repository (pip install --no-deps -e .)"
    after=$(constraints)
    [ "$after" = "$(cat "$cfile")" ] || die "a kept package changed: before: $(tr '\n' ' ' <"$cfile") after: $(tr '\n' ' ' <<<"$after")"
    "$PYTHON" -c 'import megatron.core' 2>/dev/null || die "megatron.core does not import after the install"
    echo "gpu_prepare.sh: installed; kept packages unchanged. Check the machine with: bash tools/gpu_smoke.sh --quick"
    ;;
  download)
    dir=${2:-}; pyver=${3:-3.12}
    [ -n "$dir" ] || die "download needs a directory: bash tools/gpu_prepare.sh download DIR [PYVER]"
    mcore=$(sed -n 's/^megatron-core==\([^ ]*\).*/\1/p' requirements-gpu.txt)
    [ -n "$mcore" ] || die "requirements-gpu.txt pins no megatron-core"
    mkdir -p "$dir"
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 --platform any -d "$dir" "megatron-core==$mcore" ||
      die "pip download megatron-core==$mcore failed"
    ls "$dir"
    ;;
  -h|--help|"")
    sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'
    ;;
  *)
    die "unknown command '$1': constraints | install [--find-links DIR] | download DIR [PYVER]"
    ;;
esac

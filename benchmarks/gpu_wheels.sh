#!/usr/bin/env bash
# Download the Python packages the GPU machine lacks for alseg's run path and pack them for the trip.
#
#   bash benchmarks/gpu_wheels.sh            # -> .whl/wheels/*.whl and .whl/pack/site-py312.tar.xz
#   bash benchmarks/gpu_wheels.sh --verify   # also import the packed set with the local Python (see below)
#   bash benchmarks/gpu_wheels.sh --verify-only   # the check alone, on the wheels already in .whl/wheels
#
# The GPU machine (Python 3.12, torch 2.11, no package registry) has torch, numpy, scipy, pandas, scikit-image,
# matplotlib, typer, rich, PyYAML, tqdm, timm, ...; it lacks nnU-Net and the packages below (DEVELOPERS.md says
# how they were found). The wheels alone are about 70 MiB (SimpleITK 50 MiB), more than the 64 MiB a call may
# carry, so they are installed here into a staging folder for CPython 3.12 / manylinux x86-64 and packed as one
# .tar.xz (about 39 MiB). Only .whl/pack travels (name it in the device call's `carry`); .whl/ is git-ignored
# through .git/info/exclude and never committed.
#
# --verify installs the same versions for the local Python (cp311 builds of the four cp312-only wheels; the
# others are py3 or abi3 and used as downloaded) into a scratch folder and runs
# `benchmarks/gpu_check.py --imports-only` with that folder first on PYTHONPATH. The cp312 wheels themselves
# cannot be imported with Python 3.11: that part is only checked on the GPU machine.
set -euo pipefail

cd "$(git rev-parse --show-toplevel)"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

PY=${PYTHON:-python3}
WHEELS=.whl/wheels
PACK=.whl/pack
STAGE=${STAGE:-/tmp/alseg_site312}
LIMIT_MIB=64

PLATFORMS=(
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64
)
# the versions alseg is tested with (constraints.txt pins nnunetv2; the rest as in the tested environment)
PACKAGES=(
    nnunetv2==2.8.1
    batchgenerators==0.25.5
    batchgeneratorsv2==0.3.6
    dynamic_network_architectures==0.4.4
    blosc2==4.14.1
    ndindex==1.10.1
    numexpr==2.14.2
    connected-components-3d==4.1.1
    SimpleITK==2.5.7
    nibabel==5.4.2
    monai==1.6.1
    pydantic==2.14.4
    pydantic_core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing_extensions==4.16.0
)
# no wheel on PyPI: built here from its source archive (pure Python, py3-none-any)
SDIST_ONLY=(acvl_utils==0.2.6)
# built for one CPython only: --verify takes their cp311 builds
CP312_ONLY=(connected-components-3d==4.1.1 ndindex==1.10.1 numexpr==2.14.2 pydantic_core==2.50.5)

MODE=${1:-}
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }

if [ "$MODE" != "--verify-only" ]; then
    rm -rf "$WHEELS" "$PACK"
    mkdir -p "$WHEELS" "$PACK"
    echo "downloading ${#PACKAGES[@]} wheels for CPython 3.12, manylinux x86-64 ..."
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
        -d "$WHEELS" "${PACKAGES[@]}"
    sdist=$(mktemp -d)
    for spec in "${SDIST_ONLY[@]}"; do
        "$PY" -m pip download -q --no-deps --no-binary=:all: -d "$sdist" "$spec"
    done
    "$PY" -m pip wheel -q --no-deps -w "$WHEELS" "$sdist"/*
    rm -rf "$sdist"

    dupes=$(ls "$WHEELS" | sed -E 's/-[0-9].*//' | tr 'A-Z_' 'a-z-' | sort | uniq -d)
    if [ -n "$dupes" ]; then
        echo "two versions of: $dupes (keep one)" >&2
        exit 1
    fi

    echo "staging the install for CPython 3.12 in $STAGE ..."
    rm -rf "$STAGE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" --target "$STAGE" "$WHEELS"/*.whl
    rm -rf "$STAGE/bin" # console scripts with this machine's interpreter path: not used there
    echo "packing (xz -9e, a few minutes) ..."
    tar -C "$STAGE" -cf - . | xz -9e -T0 >"$PACK/site-py312.tar.xz"

    echo
    echo "wheel                                                                      bytes"
    for w in "$WHEELS"/*.whl; do printf '%-70s %10d\n' "$(basename "$w")" "$(stat -c %s "$w")"; done
    wheels=$(cat "$WHEELS"/*.whl | wc -c)
    packed=$(stat -c %s "$PACK/site-py312.tar.xz")
    staged=$(du -sb "$STAGE" | cut -f1)
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
    echo "wheels: $(mib "$wheels"); installed: $(mib "$staged"); packed: $(mib "$packed") ($PACK/site-py312.tar.xz)"
    echo "working tree that travels besides: $(mib "$tree"); with the pack: $(mib $((tree + packed))) of $LIMIT_MIB MiB"
    if [ $((tree + packed)) -gt $((LIMIT_MIB * 1048576)) ]; then
        echo "over the $LIMIT_MIB MiB a device call may carry" >&2
        exit 1
    fi
fi

if [ "$MODE" = "--verify" ] || [ "$MODE" = "--verify-only" ]; then
    VPY=${VERIFY_PYTHON:-.venv/bin/python}
    case "$VPY" in /*) ;; */*) VPY="$PWD/$VPY" ;; esac # absolute, links kept (a venv's python is one)
    pyver=$("$VPY" -c 'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')
    scratch=$(mktemp -d)
    alt=$(mktemp -d)
    echo "verifying with $VPY (CPython $pyver) in $scratch ..."
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${PLATFORMS[@]}" -d "$alt" "${CP312_ONLY[@]}"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$scratch" \
        $(ls "$WHEELS"/*.whl | grep -v -- '-cp312-cp312-') "$alt"/*.whl
    out=$(cd /tmp && PYTHONPATH="$scratch" "$VPY" "$OLDPWD/benchmarks/gpu_check.py" --imports-only 2>/dev/null)
    echo "$out"
    for m in SimpleITK acvl_utils batchgenerators batchgeneratorsv2 blosc2 dynamic_network_architectures monai \
        nibabel nnunetv2 pydantic; do
        if ! grep -q "^$m .*$scratch" <<<"$out"; then
            echo "$m was not imported from the packed set" >&2
            exit 1
        fi
    done
    echo "verified: the run path imports, and its carried packages come from the packed set"
    rm -rf "$scratch" "$alt"
fi
echo
echo "carry .whl/pack; on the GPU machine start the command with:"
echo "  python3 -c \"import tarfile; tarfile.open('.whl/pack/site-py312.tar.xz').extractall('/tmp/site', filter='data')\" && export PYTHONPATH=/tmp/site || exit;"

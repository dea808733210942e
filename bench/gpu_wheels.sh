#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network: what geoloc and bench/gpu_check.py import there but its
# image lacks (Python 3.12, torch 2.11, transformers, accelerate, torchvision, pillow, pandas, safetensors,
# matplotlib, tqdm, pyyaml, psutil, ninja, msgpack, einops, py-cpuinfo are there; see the device notes).
# Run here, from the repository root, with network to PyPI:
#
#     bash bench/gpu_wheels.sh            # -> .whl/*.whl (git-ignored), one version of each package
#
# The versions are those CI tests with. Binaries are fetched for CPython 3.12 on manylinux x86_64;
# deepspeed comes as an sdist and is built here into a pure-Python wheel (no ops compiled: DeepSpeed
# JIT-builds what it needs on the GPU machine, and the trainer uses torch's AdamW, so none is needed).
# wandb is not carried: it is imported only with --report-to wandb.
set -euo pipefail

DEST=${DEST:-.whl}
PIP=${PIP:-python3 -m pip}
# webdataset's and omegaconf's needs, deepspeed's (pydantic and its needs; hjson), newer typing-extensions
# than some images have (pydantic 2.14 needs >= 4.16)
BINARIES=(
  webdataset==1.0.2 braceexpand==0.1.7 omegaconf==2.4.0
  hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  typing-extensions==4.16.0
)
SDISTS=(deepspeed==0.19.8)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)

mkdir -p "$DEST"
$PIP download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
    -d "$DEST" "${BINARIES[@]}"
# DS_BUILD_OPS=0: a pure-Python wheel whatever this machine has; no CUDA torch is pulled in
DS_BUILD_OPS=0 $PIP wheel -q --no-deps -w "$DEST" "${SDISTS[@]}"

status=0
for whl in "$DEST"/*.whl; do
  case "$(basename "$whl")" in
    *-py3-none-any.whl | *-py2.py3-none-any.whl | *-cp312-*manylinux*x86_64*.whl) ;;
    *) echo "not installable on the GPU machine (Python 3.12, x86_64): $whl" >&2; status=1 ;;
  esac
done
# one version of each: two would stop the whole install there
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dups" ]; then echo "several versions of: $dups (remove the old ones from $DEST)" >&2; status=1; fi
ls -l "$DEST"
du -sh "$DEST"
exit $status

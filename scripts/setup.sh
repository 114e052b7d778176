#!/usr/bin/env bash
# Set up medkd on a fresh Debian machine: the real data sets from Debian packages, a
# virtual environment in .venv, and medkd installed (editable) with its test extras.
# Safe to rerun: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
[ -f /usr/share/mricron/templates/ch2.nii.gz ] || need_apt+=(mricron-data)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need_apt+=(dataset-fashion-mnist)
# Head CT for data=ct: an InVesalius project under /usr/share/doc (a dpkg path-exclude of
# /usr/share/doc/* drops it; remove that rule).
[ -f /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || need_apt+=(invesalius-examples)
# Firmware runtime: cross-build for Jetson (aarch64) and run its checks under qemu-user.
[ -x /usr/bin/aarch64-linux-gnu-gcc ] || need_apt+=(gcc-aarch64-linux-gnu)
# Only a Recommends of the compiler: name it for apt setups that skip those.
[ -f /usr/aarch64-linux-gnu/include/stdio.h ] || need_apt+=(libc6-dev-arm64-cross)
[ -x /usr/bin/qemu-aarch64 ] || need_apt+=(qemu-user)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch/torchvision are pinned in pyproject.toml; installing them first, by exact
# version, keeps pip from resolving any other (multi-GB) torch build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
echo "setup: done (.venv ready)"

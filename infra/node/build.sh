#!/bin/sh
# Build the node image and print its expected SEV-SNP launch measurement.
#   infra/node/build.sh OVMF.fd VCPUS VCPU_TYPE   e.g. build.sh /usr/share/ovmf/OVMF.fd 32 EPYC-Genoa
# Needs mkosi >= 24 and `pip install 'openpcc[deploy]'`. Build host only (it has a shell).
set -eu
OVMF=${1:?OVMF firmware path}
VCPUS=${2:?vCPU count of the VM}
VCPU_TYPE=${3:?QEMU CPU model, e.g. EPYC-Genoa}
cd "$(dirname "$0")"
mkdir -p src
python3 -m pip wheel --no-deps -w src ../..
mkosi --force --build-sources=src:/work/src build
KERNEL=$(ls mkosi.output/openpcc-node.vmlinuz)
INITRD=mkosi.output/openpcc-node.cpio.zst
CMDLINE=$(cat cmdline.txt)  # byte for byte what launch-qemu.sh passes with -append
openpcc release measure --ovmf "$OVMF" --kernel "$KERNEL" --initrd "$INITRD" \
    --append "$CMDLINE" --vcpus "$VCPUS" --vcpu-type "$VCPU_TYPE"

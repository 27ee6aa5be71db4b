#!/bin/sh
# Launch the node as an SEV-SNP guest with measured direct boot (QEMU >= 9.1 with SNP).
#   launch-qemu.sh OVMF.fd VCPUS VCPU_TYPE MODEL_DISK GPU_BDF NODE_ENV
# NODE_ENV: per-VM, unmeasured settings (OPENPCC_NODE_PUBLIC_URL, an IP address inside
# the gateway's --node-network; OPENPCC_NODE_GATEWAY_INTERNAL; and
# OPENPCC_NODE_ADMISSION_CREDENTIAL, the opnc1.NAME.SECRET the gateway operator issued)
# via fw_cfg. It holds the credential: readable only by the user QEMU runs as.
# The measurement the guest gets equals `openpcc release measure` over the same
# OVMF/kernel/initrd/cmdline.txt/VCPUS/VCPU_TYPE, and the kernel-hashes=on option is
# what puts kernel, initrd and command line into it.
set -eu
OVMF=$1 VCPUS=$2 VCPU_TYPE=$3 MODEL_DISK=$4 GPU_BDF=$5 NODE_ENV=$6
cd "$(dirname "$0")"
exec qemu-system-x86_64 \
    -enable-kvm -nographic -no-reboot \
    -machine q35,confidential-guest-support=sev0,memory-backend=ram0 \
    -object memory-backend-memfd,id=ram0,size=192G,share=true,prealloc=false \
    -object sev-snp-guest,id=sev0,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on \
    -cpu "$VCPU_TYPE" -smp "$VCPUS" \
    -bios "$OVMF" \
    -kernel mkosi.output/openpcc-node.vmlinuz \
    -initrd mkosi.output/openpcc-node.cpio.zst \
    -append "$(cat cmdline.txt)" \
    -drive file="$MODEL_DISK",if=virtio,format=raw,readonly=on \
    -device pcie-root-port,id=pci.1,bus=pcie.0 \
    -device vfio-pci,host="$GPU_BDF",bus=pci.1 \
    -fw_cfg name=opt/ovmf/X-PciMmio64Mb,string=262144 \
    -fw_cfg name=opt/openpcc/node.env,file="$NODE_ENV" \
    -netdev tap,id=net0,ifname=tap-node,script=no,downscript=no \
    -device virtio-net-pci,netdev=net0

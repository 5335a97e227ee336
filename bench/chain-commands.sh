#!/bin/bash
# convert of a 1 GiB chain, commit and safe rebase: snapstack vs qemu-img 7.2 on the same chain, 3 runs each
# (after npm run build). Prints one line per run; docs/performance.md quotes the medians.
set -e
S="node $(cd "$(dirname "$0")/.." && pwd)/bin/snapstack.js"
D=${TMPDIR:-/tmp}/snapstack-chain-commands; rm -rf $D; mkdir -p $D; cd $D
mk() {
  rm -f base.qcow2 mid.qcow2 top.qcow2
  qemu-img create -q -f qcow2 base.qcow2 1G
  qemu-io -c 'write -P 1 0 512M' base.qcow2 >/dev/null
  qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
  qemu-io -c 'write -P 2 256M 256M' mid.qcow2 >/dev/null
  qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
  qemu-io -c 'write -P 3 384M 256M' top.qcow2 >/dev/null
}
t() { local s=$(date +%s.%N); "$@" >/dev/null; echo "$(echo "$(date +%s.%N) - $s" | bc)"; }
mk
for r in 1 2 3; do
  rm -f out.qcow2; q=$(t qemu-img convert -O qcow2 top.qcow2 out.qcow2)
  rm -f out.qcow2; s=$(t $S img convert -O qcow2 top.qcow2 out.qcow2)
  echo "convert 1 GiB chain (768 MiB data, depth 2): qemu-img ${q}s snapstack ${s}s"
done
for r in 1 2 3; do
  mk; q=$(t qemu-img commit -q top.qcow2)
  mk; s=$(t $S img commit -q top.qcow2)
  echo "commit top (256 MiB) into mid: qemu-img ${q}s snapstack ${s}s"
done
for r in 1 2 3; do
  mk; q=$(t qemu-img rebase -q -b base.qcow2 -F qcow2 top.qcow2)
  mk; s=$(t $S img rebase -q -b base.qcow2 -F qcow2 top.qcow2)
  echo "safe rebase top onto base (copies mid's 256 MiB): qemu-img ${q}s snapstack ${s}s"
done
rm -rf "$D"

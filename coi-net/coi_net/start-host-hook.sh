#!/bin/sh
# coi-net-hook: the lxc.hook.start-host of a coi session container (coi-net apply
# sets it in the container's raw.lxc). LXC runs it as root right before the
# container's init, once its veth exists. The port's policy in force: nothing to
# do. Missing (a host reboot, a flushed ruleset, a deleted table): coi-net restore
# puts the recorded one back. No recorded policy, or restore fails: exit 1, and
# Incus does not start the container (fail closed).
# Arguments, all checked by coi-net apply: TABLE IFNAME CONTAINER PROJECT STATE_DIR
set -u
PATH=/usr/sbin:/usr/bin:/sbin:/bin
if [ $# -ne 5 ]; then
  echo "coi-net-hook: expected TABLE IFNAME CONTAINER PROJECT STATE_DIR" >&2
  exit 1
fi
nft get element bridge "$1" ports "{ $2 }" >/dev/null 2>&1 && exit 0
HOME=${HOME:-/root} COI_NFT_TABLE=$1 COI_INCUS_PROJECT=$4 COI_NET_STATE_DIR=$5 \
  exec "${0%/*}/coi-net" restore "$3"

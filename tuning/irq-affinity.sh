#!/usr/bin/env bash
# Pins each receive queue's IRQ of a NIC to one CPU of the dataplane's cores, round robin,
# and sets RPS/XPS to match, so a connection's packets are handled on the core whose
# executor serves it. Prints what it would do; changes nothing without --apply (root).
#
#   tuning/irq-affinity.sh --dev eth0 --cores 2-7 [--apply]
set -euo pipefail
dev="" cores="" apply=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dev) dev=$2; shift 2 ;;
        --cores) cores=$2; shift 2 ;;
        --apply) apply=1; shift ;;
        -h|--help) sed -n 2,7p "$0"; exit 0 ;;
        *) echo "irq-affinity.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
[ -n "$dev" ] && [ -n "$cores" ] || { echo "irq-affinity.sh: --dev and --cores are required" >&2; exit 2; }
[ -d "/sys/class/net/$dev" ] || { echo "irq-affinity.sh: no network device $dev" >&2; exit 2; }

# Expand "2-4,7" into "2 3 4 7".
list=()
IFS=, read -ra parts <<<"$cores"
for p in "${parts[@]}"; do
    if [[ $p == *-* ]]; then for ((c=${p%-*}; c<=${p#*-}; c++)); do list+=("$c"); done
    else list+=("$p"); fi
done
[ ${#list[@]} -gt 0 ] || { echo "irq-affinity.sh: --cores $cores lists no CPU" >&2; exit 2; }

do_write() { # value file
    if [ $apply = 1 ]; then echo "$1" >"$2" && echo "set $2 = $1"; else echo "would set $2 = $1"; fi
}

i=0
irqs=$(grep -E "$dev(-|$)" /proc/interrupts | awk -F: '{gsub(/ /,"",$1); print $1}' || true)
[ -n "$irqs" ] || echo "note: no IRQ named after $dev in /proc/interrupts (virtual NIC?); setting RPS/XPS only"
for irq in $irqs; do
    do_write "${list[$((i % ${#list[@]}))]}" "/proc/irq/$irq/smp_affinity_list"
    i=$((i + 1))
done
mask=0
for c in "${list[@]}"; do mask=$((mask | (1 << c))); done
hex=$(printf '%x' "$mask")
for q in /sys/class/net/"$dev"/queues/rx-*; do [ -e "$q/rps_cpus" ] && do_write "$hex" "$q/rps_cpus"; done
j=0
for q in /sys/class/net/"$dev"/queues/tx-*; do
    [ -e "$q/xps_cpus" ] && do_write "$(printf '%x' $((1 << ${list[$((j % ${#list[@]}))]})))" "$q/xps_cpus"
    j=$((j + 1))
done
[ $apply = 1 ] || echo "dry run: nothing changed; add --apply (as root) to write these"

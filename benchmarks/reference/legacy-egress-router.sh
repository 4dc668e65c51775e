#!/bin/bash
# Benchmark reference: the legacy OpenShift egress-router image's init mode, re-done as a plain
# shell script (written for these benchmarks, not taken from the image). It makes the same calls
# the legacy image made, in the same way, so its wall time is what the legacy approach costs:
#
#   ip addr add SRC dev macvlan0; ip link set up dev macvlan0
#   ip route add GW/32 dev macvlan0; ip route del default; ip route add default via GW dev macvlan0
#   echo 1 > /proc/sys/net/ipv4/ip_forward
#   iptables -t nat -A PREROUTING -i eth0 -p PROTO --dport PORT -j DNAT --to-destination IP[:RPORT]
#       ... one iptables process per EGRESS_DESTINATION rule, then the fallback rule, then
#   iptables -t nat -A POSTROUTING -j SNAT --to-source SRC
#   arping -q -A -c 1 -I macvlan0 SRC                 (iputils arping, waited for)
#   (sleep 2; arping -q -U -c 1 -I macvlan0 SRC) &    (not waited for: the script exits)
#
# Input: the same environment as egress-router: EGRESS_SOURCE (IPv4, optionally /prefix),
# EGRESS_GATEWAY, EGRESS_DESTINATION (lines "port proto ip [remote_port]", then optionally a lone
# fallback IP; '#' comments and blank lines ignored). The interfaces are fixed, as in the legacy
# image: macvlan0 (egress) and eth0 (pod side). Meant for a fresh network namespace (the lab):
# like the legacy image it neither flushes nor checks for rules already there.
#
# Benchmark-only knobs (none changes what is done):
#   ARPING=/path/to/arping    which arping to run (must be iputils arping; default: arping on PATH)
#   LEGACY_BG_PIDFILE=FILE    write the pid of the background (-U) arping job to FILE; the job runs
#                             in its own session (setsid), so that pid is also its process group
#   LEGACY_TRACE=FILE         write "label start end" lines (EPOCHREALTIME) for every command run
set -o errexit -o nounset -o pipefail

script_start=$EPOCHREALTIME

die() {
    printf 'legacy-egress-router: %s\n' "$*" >&2
    exit 1
}

arping_tool=${ARPING:-arping}
for tool in ip iptables setsid "$arping_tool"; do
    command -v "$tool" > /dev/null || die "$tool not found (iputils arping: apt-get install iputils-arping)"
done

trace_file=${LEGACY_TRACE:-}
trace=()
run() {  # run one command; with LEGACY_TRACE, note when it started and ended
    if [[ -z $trace_file ]]; then
        "$@"
        return
    fi
    local started=$EPOCHREALTIME
    "$@"
    trace+=("${1##*/} $started $EPOCHREALTIME")
}

ip_re='[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}'
port_re='[0-9]{1,5}'

source_spec=${EGRESS_SOURCE:-}
[[ $source_spec =~ ^${ip_re}(/[0-9]{1,2})?$ ]] || die "EGRESS_SOURCE unset or not an IPv4 address[/prefix]"
source_ip=${source_spec%%/*}
gateway=${EGRESS_GATEWAY:-}
[[ $gateway =~ ^${ip_re}$ ]] || die "EGRESS_GATEWAY unset or not an IPv4 address"
[[ -n ${EGRESS_DESTINATION:-} ]] || die "EGRESS_DESTINATION unset"

# Read the rules first (bash builtins only), so a bad line stops us before any change.
protos=() ports=() targets=()  # one entry per port rule
fallback=""
set -o noglob
while IFS= read -r line || [[ -n $line ]]; do
    line=${line%%#*}
    # shellcheck disable=SC2206  # word splitting on blanks is the point (globbing is off)
    fields=($line)
    (( ${#fields[@]} > 0 )) || continue
    [[ -z $fallback ]] || die "EGRESS_DESTINATION: the fallback IP must be the last line"
    if (( ${#fields[@]} == 1 )); then
        [[ ${fields[0]} =~ ^${ip_re}$ ]] || die "EGRESS_DESTINATION: bad fallback line: $line"
        fallback=${fields[0]}
        continue
    fi
    (( ${#fields[@]} == 3 || ${#fields[@]} == 4 )) || die "EGRESS_DESTINATION: bad line: $line"
    port=${fields[0]} proto=${fields[1],,} dest=${fields[2]}
    [[ $port =~ ^${port_re}$ && $proto =~ ^(tcp|udp|sctp)$ && $dest =~ ^${ip_re}$ ]] ||
        die "EGRESS_DESTINATION: bad line: $line"
    if (( ${#fields[@]} == 4 )); then
        [[ ${fields[3]} =~ ^${port_re}$ ]] || die "EGRESS_DESTINATION: bad remote port: $line"
        dest+=":${fields[3]}"
    fi
    protos+=("$proto") ports+=("$port") targets+=("$dest")
done <<< "$EGRESS_DESTINATION"
set +o noglob
(( ${#ports[@]} > 0 )) || [[ -n $fallback ]] || die "EGRESS_DESTINATION has no rules"

# The network, as the legacy image set it up.
run ip addr add "$source_spec" dev macvlan0
run ip link set up dev macvlan0
run ip route add "$gateway/32" dev macvlan0
run ip route del default
run ip route add default via "$gateway" dev macvlan0
echo 1 > /proc/sys/net/ipv4/ip_forward

# NAT: one iptables process per rule, as the legacy image did.
for i in "${!ports[@]}"; do
    run iptables -t nat -A PREROUTING -i eth0 -p "${protos[i]}" --dport "${ports[i]}" \
        -j DNAT --to-destination "${targets[i]}"
done
if [[ -n $fallback ]]; then
    run iptables -t nat -A PREROUTING -i eth0 -j DNAT --to-destination "$fallback"
fi
run iptables -t nat -A POSTROUTING -j SNAT --to-source "$source_ip"

# Gratuitous ARP, as ifup does: an answer-form announcement now, waited for ...
run "$arping_tool" -q -A -c 1 -I macvlan0 "$source_ip"
# ... and a request-form one two seconds later, in the background (not waited for).
setsid bash -c 'sleep 2; exec "$0" -q -U -c 1 -I macvlan0 "$1"' "$arping_tool" "$source_ip" \
    < /dev/null > /dev/null 2>&1 &
if [[ -n ${LEGACY_BG_PIDFILE:-} ]]; then
    echo "$!" > "$LEGACY_BG_PIDFILE"
fi

if [[ -n $trace_file ]]; then
    printf '%s\n' "script $script_start $EPOCHREALTIME" "${trace[@]}" > "$trace_file"
fi

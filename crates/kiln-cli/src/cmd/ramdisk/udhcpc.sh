#!/bin/sh
# udhcpc's hook in kiln's ramdisk: the address and the default route, no
# DNS (the agent is given the server's address). /run/kiln-net says what
# was set, for /init's console line.
case "$1" in
deconfig)
    ip -4 addr flush dev "$interface"
    ip link set "$interface" up
    ;;
bound | renew)
    ip -4 addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    if [ -n "$router" ]; then
        ip route replace default via "${router%% *}" dev "$interface"
    fi
    echo "$ip/${mask:-24}${router:+ router ${router%% *}}" >/run/kiln-net
    ;;
esac
exit 0

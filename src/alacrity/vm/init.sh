#!/bin/busybox sh
# /init of the Alacrity guest initramfs. The host scans ttyS0 for the marker lines,
# so they are printed on lines of their own and never suppressed.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts

while read -r mod; do
    insmod "/lib/modules/$mod.ko" 2>/dev/null || echo "alacrity: insmod $mod failed"
done < /etc/alacrity/modules
acpid -l /tmp/acpid.log -p /tmp/acpid.pid 2>/dev/null

ip=; gw=; cmd=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        alacrity.ip=*) ip="${arg#alacrity.ip=}" ;;
        alacrity.gw=*) gw="${arg#alacrity.gw=}" ;;
        alacrity.cmd=*) cmd="${arg#alacrity.cmd=}" ;;
    esac
done

ip link set lo up
ip addr add 127.0.0.1/8 dev lo 2>/dev/null
if [ -n "$ip" ]; then
    # The NIC may register a moment after its driver loads.
    n=0
    while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    ip addr add "$ip" dev eth0 && ip link set eth0 up || echo "alacrity: eth0 setup failed"
    [ -n "$gw" ] && ip route add default via "$gw"
fi

# The guest agent (alacrity vm exec, vm cp), on vsock port 1024 (agent/protocol.py),
# where the VM has a vsock device; without one it cannot listen, and exits.
[ -x /usr/sbin/alacrity-agent ] && setsid alacrity-agent --vsock 1024 </dev/null >/dev/null 2>&1 &

echo
echo ALACRITY-READY

if [ -n "$cmd" ]; then
    echo "$cmd" | base64 -d > /tmp/alacrity-cmd
    sh -c "$(cat /tmp/alacrity-cmd)"
    status=$?
    echo
    echo "ALACRITY-EXIT=$status"
else
    setsid cttyhack sh
fi
sync
poweroff -f

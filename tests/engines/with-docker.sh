#!/bin/bash
# Run a command against a current Docker engine (test infrastructure, not part of the plugin):
#
#   tests/engines/with-docker.sh python3 -m pytest -q -m docker
#
# The engine comes from tests/engines/fetch-docker.sh (Debian sid's docker.io 28.x + containerd 2 +
# Compose v2, bookworm's runc). It and the command run in a sandbox, so a second engine never touches
# the machine's own one (its iptables chains, /run/docker, /var/lib/docker, its containerd):
#   - a network namespace of its own, with lo and an `uplink` (203.0.113.10/24, default route via .1,
#     a veth whose far end stays unaddressed in the namespace: nothing leaves it), where the engine sets up its own firewall;
#   - a private mount namespace with tmpfs over /run/docker (plugin sockets, exec root), /run/containerd
#     and /run/netns, and /sys/class/net showing the sandbox's interfaces;
#   - its own --data-root, --pidfile, --config-file, cgroup parent and socket; DOCKER_HOST points at it
#     and DOCKER_CONFIG at a directory with Compose v2 as a CLI plugin.
# The engine is stopped and everything removed on exit, also on failure or Ctrl-C; the command's exit
# status is returned. Environment for the command: VPCNET_TEST_ENGINE=<dockerd version>,
# VPCNET_TEST_DOCKERD_LOG=<the engine's log>.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARG ...]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "with-docker.sh: must run as root" >&2; exit 1; }
DIR=$("$HERE/fetch-docker.sh")

ID=vpcnet-ci-eng-$$
NS=$ID
DATA=/var/lib/$ID
CGROUP=$ID
LOG=${VPCNET_CI_DOCKERD_LOG:-/var/log/vpcnet-ci-docker-current.log}     # overwritten by each run

kill_cgroup() {     # every process left in the engine's cgroup parent (containers), bounded
    local _ pids
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=$(cat /sys/fs/cgroup/*/"$CGROUP"/cgroup.procs /sys/fs/cgroup/*/"$CGROUP"/*/cgroup.procs \
                   /sys/fs/cgroup/"$CGROUP"/cgroup.procs /sys/fs/cgroup/"$CGROUP"/*/cgroup.procs 2>/dev/null || true)
        [ -n "$pids" ] || break
        kill -9 $pids 2>/dev/null || true
        sleep 0.2
    done
    find /sys/fs/cgroup -depth -type d -path "*/$CGROUP*" -exec rmdir {} + 2>/dev/null || true
}

cleanup() {
    local pid _
    if [ -f "$DATA/dockerd.pid" ]; then     # normally already stopped by the inner script
        pid=$(cat "$DATA/dockerd.pid" 2>/dev/null || true)
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill "$pid" 2>/dev/null || true
            timeout 40 tail --pid="$pid" -f /dev/null 2>/dev/null || kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    kill_cgroup
    if ip netns list | grep -qw "$NS"; then
        for _ in 1 2 3 4 5; do   # containerd, shims, anything else still in the sandbox's network
            pids=$(ip netns pids "$NS" 2>/dev/null || true)
            [ -n "$pids" ] || break
            kill -9 $pids 2>/dev/null || true
            sleep 0.2
        done
        ip netns del "$NS" 2>/dev/null || true
    fi
    rm -rf "$DATA"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$DATA"
ip netns add "$NS"
ip -n "$NS" link set lo up
# forwarding off, as on a host at boot: the engine turns it on and so sets FORWARD to DROP, as on a real host
# (a new namespace copies the host's value, which the host's own engine has already turned on)
ip netns exec "$NS" sysctl -qw net.ipv4.ip_forward=0
# a veth whose far end stays here, unaddressed: the default route has a device, and nothing answers on it
ip -n "$NS" link add uplink type veth peer name uplink-end
ip -n "$NS" addr add 203.0.113.10/24 dev uplink
ip -n "$NS" link set uplink-end up
ip -n "$NS" link set uplink up
ip -n "$NS" route add default via 203.0.113.1
echo '{}' >"$DATA/daemon.json"          # not /etc/docker/daemon.json: the sandbox engine's own settings
cp -r "$DIR/docker-config" "$DATA/docker-config"

# Inside: the private mount namespace, entered into the sandbox's network namespace.
INNER='
set -euo pipefail
DIR=$1 DATA=$2 CGROUP=$3 LOG=$4; shift 4
mkdir -p /run/docker /run/containerd /run/netns
mount -t tmpfs -o mode=0755,size=256m vpcnet-ci-docker /run/docker
mkdir -p /run/docker/plugins
mount -t tmpfs -o mode=0711,size=64m vpcnet-ci-containerd /run/containerd
mount -t tmpfs -o mode=0755,size=16m vpcnet-ci-netns /run/netns
sysfs=$(mktemp -d)                 # this network namespace'"'"'s view of /sys/class/net
mount -t sysfs vpcnet-ci-sysfs "$sysfs"
mount --bind "$sysfs/class/net" /sys/class/net
mount --bind "$sysfs/devices/virtual/net" /sys/devices/virtual/net
umount -l "$sysfs" && rmdir "$sysfs"
export PATH="$DIR/root/usr/sbin:$DIR/root/usr/bin:$PATH"
sock=/run/docker/docker.sock
dockerd --config-file "$DATA/daemon.json" -H "unix://$sock" --data-root "$DATA/docker" \
    --pidfile "$DATA/dockerd.pid" --cgroup-parent "/$CGROUP" >"$LOG" 2>&1 &
engine=$!
stop_engine() {
    if kill -0 "$engine" 2>/dev/null; then
        kill "$engine" 2>/dev/null || true
        timeout 40 tail --pid="$engine" -f /dev/null 2>/dev/null || kill -9 "$engine" 2>/dev/null || true
    fi
}
trap stop_engine EXIT
export DOCKER_HOST="unix://$sock" DOCKER_CONFIG="$DATA/docker-config" VPCNET_TEST_DOCKERD_LOG="$LOG"
for _ in $(seq 1 60); do
    docker version --format "{{.Server.Version}}" >/dev/null 2>&1 && break
    kill -0 "$engine" 2>/dev/null || break
    sleep 1
done
VPCNET_TEST_ENGINE=$(docker version --format "{{.Server.Version}}" 2>/dev/null) || {
    echo "with-docker.sh: the engine did not answer within 60 s; its log:" >&2; tail -40 "$LOG" >&2; exit 1; }
export VPCNET_TEST_ENGINE
echo "with-docker.sh: Docker $VPCNET_TEST_ENGINE ($(containerd --version | cut -d" " -f3)), Compose $(docker compose version --short), in netns '"$NS"'" >&2
set +e
"$@"
status=$?
set -e
exit $status
'
set +e
unshare -m --propagation private -- nsenter --net="/run/netns/$NS" -- \
    bash -c "$INNER" with-docker "$DIR" "$DATA" "$CGROUP" "$LOG" "$@"
status=$?
set -e
exit $status

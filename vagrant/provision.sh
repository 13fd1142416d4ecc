#!/usr/bin/env bash
# Provision one netplane node: install netplane (and etcd on the control plane), then
# `netplane node join` -- the command `netplane lab up` runs for each of its namespace nodes.
#
#   provision.sh ROLE NAME IP CONTROL_PLANE_IP        ROLE: control-plane | worker
#
# The Vagrantfile runs it as root on each VM. tests/e2e/test_lab_vagrant.py runs it inside network
# namespaces standing in for VMs (NETPLANE_SKIP_INSTALL=1, NETPLANE_SUPERVISOR=process).
#
# Settings (environment):
#   NETPLANE_POD_NETWORK   routes | vxlan                   (default routes)
#   NETPLANE_PROXY         nftables | iptables              (default nftables)
#   NETPLANE_LB_POOL       LoadBalancer address pool        (default 192.168.56.200-192.168.56.250)
#   NETPLANE_SRC           the netplane source tree         (default /netplane, the Vagrantfile's rsync)
#   NETPLANE_PREFIX        where the virtualenv goes        (default /opt/netplane)
#   NETPLANE_STATE_DIR     node state, store, logs          (default /var/lib/netplane)
#   NETPLANE_SUPERVISOR    systemd | process                (default systemd)
#   NETPLANE_SKIP_INSTALL  1: packages and netplane are already installed
#   NETPLANE_BIN           the netplane command             (default $NETPLANE_PREFIX/bin/netplane)
set -euo pipefail

if [ $# -ne 4 ]; then
    echo "usage: $0 control-plane|worker NODE_NAME NODE_IP CONTROL_PLANE_IP" >&2
    exit 2
fi
ROLE=$1 NAME=$2 IP=$3 CONTROL_PLANE_IP=$4
POD_NETWORK=${NETPLANE_POD_NETWORK:-routes}
PROXY=${NETPLANE_PROXY:-nftables}
LB_POOL=${NETPLANE_LB_POOL:-192.168.56.200-192.168.56.250}
# kube-dns forwards names outside the cluster to the VM's own resolver, as CoreDNS does
DNS_UPSTREAM=${NETPLANE_DNS_UPSTREAM-/etc/resolv.conf}
SRC=${NETPLANE_SRC:-/netplane}
PREFIX=${NETPLANE_PREFIX:-/opt/netplane}
STATE_DIR=${NETPLANE_STATE_DIR:-/var/lib/netplane}
SUPERVISOR=${NETPLANE_SUPERVISOR:-systemd}
NETPLANE=${NETPLANE_BIN:-$PREFIX/bin/netplane}
SERVER=http://$CONTROL_PLANE_IP:6443
PACKAGES="iproute2 nftables iptables conntrack curl dnsutils tcpdump iputils-ping procps python3-venv"

log() { echo "[provision $NAME] $*"; }

install_packages() {
    local packages=$PACKAGES
    [ "$ROLE" = control-plane ] && packages="$packages etcd-server etcd-client"
    log "installing packages: $packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $packages
    if [ "$ROLE" = control-plane ]; then
        # Debian starts its own etcd; ours is run by `node join` (its data dir under $STATE_DIR).
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
}

install_netplane() {
    log "installing netplane from $SRC into $PREFIX"
    [ -x "$PREFIX/bin/python" ] || python3 -m venv "$PREFIX"
    "$PREFIX/bin/pip" install -q --upgrade pip
    "$PREFIX/bin/pip" install -q "$SRC"
    ln -sf "$PREFIX/bin/netplane" /usr/local/bin/netplane
    # `netplane get ...` on any VM talks to the control plane.
    echo "export NETPLANE_SERVER=$SERVER" > /etc/profile.d/netplane.sh
}

wait_for_api_server() {
    log "waiting for the API server at $SERVER"
    for _ in $(seq 600); do
        if curl -sf -o /dev/null --max-time 1 "$SERVER/healthz"; then
            return 0
        fi
        sleep 0.5
    done
    echo "the API server at $SERVER did not answer within 5 minutes" >&2
    exit 1
}

if [ "${NETPLANE_SKIP_INSTALL:-}" != 1 ]; then
    install_packages
    install_netplane
fi

common=(--node-name "$NAME" --node-ip "$IP" --pod-network "$POD_NETWORK" --proxy "$PROXY"
        --state-dir "$STATE_DIR" --supervisor "$SUPERVISOR")
case "$ROLE" in
    control-plane)
        log "joining as the control plane (store: etcd)"
        "$NETPLANE" node join --control-plane "${common[@]}" --store etcd \
            --etcd-data-dir "$STATE_DIR/etcd" --lb-pool "$LB_POOL" --dns-upstream "$DNS_UPSTREAM"
        ;;
    worker)
        wait_for_api_server
        log "joining $SERVER as a worker"
        "$NETPLANE" node join --server "$SERVER" "${common[@]}"
        ;;
    *)
        echo "unknown role $ROLE (control-plane or worker)" >&2
        exit 2
        ;;
esac
log "done: try 'netplane get nodes -o wide' (as root, on any VM)"

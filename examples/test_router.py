"""An ops team's testinfra checks of an egress router: its live state must match the configuration deployed.

Needs `pip install egress-router pytest-testinfra` on the machine that runs pytest: the package's pytest
plugin (loaded by itself) provides the `egress_router` fixture. Each check runs `egress-router verify
--output json` on the host, in the router's network namespace, and fails with one line per difference.

    # the long-running router container of examples/legacy-redirect-deployment.yaml
    pytest examples/test_router.py \
        --hosts='kubectl://egress-router-legacy-7d9c6b5f4-x2x8q?container=egress-router&namespace=egress'

    # a redirect pod (init container + pause): first an ephemeral debug container with the image, kept
    # running, that shares the pod's network namespace; then point the hosts at it
    kubectl debug egress-router -c verify --image=egress-router:latest --profile=netadmin -- sleep 3600
    pytest examples/test_router.py -k 'not own_environment' --hosts='kubectl://egress-router?container=verify'

    # a container on a Docker engine, or the network namespace pytest runs in
    pytest examples/test_router.py --hosts=docker://egress-router
    ip netns exec ROUTER-NAMESPACE pytest examples/test_router.py --hosts=local://
"""

from __future__ import annotations

from egress_router.testinfra_plugin import assert_converged

# What examples/legacy-redirect-deployment.yaml deploys: the same variables as the router container gets.
# Kept beside the manifest in version control, this is the state the router must be in.
ROUTER = {
    "EGRESS_ROUTER_MODE": "legacy",
    "EGRESS_SOURCE": "192.0.2.92/24",
    "EGRESS_GATEWAY": "192.0.2.1",
    "EGRESS_DESTINATION": "443 tcp 203.0.113.60\n8443 tcp 203.0.113.61 443\n",
}


def test_router(host):
    """Addresses, routes, policy rules, NAT chains and jumps, sysctls: all as ROUTER plans them."""
    assert_converged(host, ROUTER)


def test_router_own_environment(egress_router):
    """The router container's own environment (what it really started with) is in force too: catches a
    manifest edited without a rollout. Only where verify runs in the router container itself."""
    egress_router.assert_converged()


def test_nat_rules(egress_router):
    """The NAT chains, read with the host's iptables (`host.iptables`), hold exactly the planned rules."""
    egress_router.assert_nat_rules(ROUTER)

"""The edges that change a network namespace: rtnetlink, iptables, ARP, and the dispatcher that applies a plan."""

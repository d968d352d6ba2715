# HAProxy (Debian's package) for tests/test_haproxy_nodes.py: several nodes behind one TCP load balancer.
command -v haproxy >/dev/null || apt_install haproxy

"""Operations: what an administrator reads about the node (metrics, HTTP endpoint, status).

    metrics     the node's counters
    http        /healthz and Prometheus /metrics
    status      the `status` report, read from the on-disk layout
"""

"""Pipeline: from spooled instances to delivered studies (above the store and the sinks).

    completion  per-study idle timers (clock passed in)
    cache       work done ahead while the node is quiet (headers parsed, studies converted),
                fed with arrivals
    retry       the retry policy (backoff with jitter, capped) as a value object
    delivery    one study: spooled headers -> mapping -> every sink (no threads)
    worker      the delivery thread: retries, dead letter, journal
"""

"""Counters for /metrics, kept as plain ints on the hot path and turned into Prometheus families only
when scraped (a prometheus_client Counter.labels() call per query would cost more than the answer).

Each thread that answers queries writes its own DnsMetrics (no counter has two writers, so none loses
an increment); the one registered for /metrics adds its `shards` in when scraped."""
from __future__ import annotations

from bisect import bisect_left
from time import perf_counter

from dnslib import RCODE

from netplane.dns.wire import type_name

BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0)


class DnsMetrics:
    def __init__(self):
        self.queries: dict[tuple[int, int, str], int] = {}  # (qtype, rcode, proto) -> count
        self.bucket_counts = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.dropped = 0
        self.cache_hits = 0
        self.cache_misses = 0
        self.upstream_errors: dict[str, int] = {}
        self.zone_builds = 0
        self.zone_names = 0
        self.udp_batches = 0  # recvmmsg calls that returned queries (queries / batches: the batch size)
        self.shards: list[DnsMetrics] = []  # other threads' counters, added in when scraped

    def count(self, qtype: int, rcode: int, proto: str, started: float) -> None:
        key = (qtype, rcode, proto)
        self.queries[key] = self.queries.get(key, 0) + 1
        self.observe(perf_counter() - started)

    def observe(self, seconds: float, replies: int = 1) -> None:
        """`replies` answered in `seconds` each (a batch is timed once, from receipt to reply)."""
        self.bucket_counts[bisect_left(BUCKETS, seconds)] += replies
        self.latency_sum += seconds * replies

    def answered(self, reply: bytes, proto: str, started: float) -> None:
        """Count a reply by its question type and rcode, read back from the reply bytes."""
        end = reply.find(0, 12)
        qtype = (reply[end + 1] << 8) | reply[end + 2] if 0 < end < len(reply) - 2 else 0
        self.count(qtype, reply[3] & 0xF, proto, started)

    def upstream_error(self, upstream: str) -> None:
        self.upstream_errors[upstream] = self.upstream_errors.get(upstream, 0) + 1

    def total(self) -> tuple[dict, list[int], float, int, int]:
        """(queries, bucket counts, latency sum, dropped, cache hits) of this and its shards."""
        queries: dict[tuple[int, int, str], int] = {}
        buckets, latency, dropped, hits = [0] * len(self.bucket_counts), 0.0, 0, 0
        for part in (self, *self.shards):
            for key, count in list(part.queries.items()):  # list(): one C call, safe while another thread counts
                queries[key] = queries.get(key, 0) + count
            buckets = [a + b for a, b in zip(buckets, part.bucket_counts)]
            latency += part.latency_sum
            dropped += part.dropped
            hits += part.cache_hits
        return queries, buckets, latency, dropped, hits

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        all_queries, bucket_counts, latency_sum, dropped, cache_hits = self.total()
        queries = CounterMetricFamily("netplane_dns_queries", "DNS replies sent, by question type, rcode and protocol",
                                      labels=["type", "rcode", "proto"])
        for (qtype, rcode, proto), count in sorted(all_queries.items()):
            queries.add_metric([type_name(qtype), RCODE.get(rcode, str(rcode)), proto], count)
        yield queries
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], bucket_counts):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily("netplane_dns_request_duration_seconds",
                                    "Time from receiving a query to sending its reply",
                                    buckets=buckets, sum_value=latency_sum)
        yield CounterMetricFamily("netplane_dns_dropped", "Queries dropped without a reply", value=dropped)
        yield CounterMetricFamily("netplane_dns_cache_hits", "Forwarded names answered from the cache",
                                  value=cache_hits)
        yield CounterMetricFamily("netplane_dns_cache_misses", "Forwarded names asked upstream",
                                  value=self.cache_misses)
        errors = CounterMetricFamily("netplane_dns_upstream_errors", "Upstream queries that failed",
                                     labels=["upstream"])
        for upstream, count in sorted(self.upstream_errors.items()):
            errors.add_metric([upstream], count)
        yield errors
        yield CounterMetricFamily("netplane_dns_udp_batches", "UDP receive calls that returned queries",
                                  value=sum(part.udp_batches for part in (self, *self.shards)))
        yield CounterMetricFamily("netplane_dns_zone_builds", "Zone rebuilds", value=self.zone_builds)
        yield GaugeMetricFamily("netplane_dns_zone_names", "Names in the current cluster zone",
                                value=self.zone_names)

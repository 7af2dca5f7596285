"""Prometheus metrics of one receiver, in a registry of its own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ReceiverMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.bytes_received = Counter("kvwire_bytes_received", "Bytes of frames received", registry=self.registry)
        self.transfers = Counter("kvwire_transfers", "Transfers by outcome", ["outcome"], registry=self.registry)
        self.transfer_seconds = Histogram("kvwire_transfer_seconds", "Time to receive and assemble a transfer",
                                          buckets=TIME_BUCKETS, registry=self.registry)
        self.decode_seconds = Histogram("kvwire_decode_seconds", "Time to inject and decode an answer",
                                        buckets=TIME_BUCKETS, registry=self.registry)
        self.active_sessions = Gauge("kvwire_active_sessions", "Sessions held in memory", registry=self.registry)
        self.inflight = Gauge("kvwire_inflight_transfers", "Transfers still streaming", registry=self.registry)
        self.rejected_frames = Counter("kvwire_rejected_frames", "Transfers rejected, by gRPC status",
                                       ["reason"], registry=self.registry)

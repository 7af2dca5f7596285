"""Hostile clients for `kvwire bench soak`: each loops over the attacks of issue 31 against a live
receiver, and counts the status each got. They run in a process of their own (see channel/soak.py).

Every attack is bounded in time (a deadline on each call) and in size (at most the receiver's
8 MiB message limit). What they need of the model is computed once by the parent (`materials`)
and passed as bytes: this process loads no model.
"""

from __future__ import annotations

import random
import re
import threading
import time
import uuid
from collections import Counter

import grpc

CALL_TIMEOUT_S = 30.0


def materials(loaded, target: str, token: str, idle_s: float) -> dict:
    """What the attacks send, built from the model once: picklable bytes and numbers."""
    import torch

    from common import wire
    from common.kvstate import prefill
    from common.profile import ProfileError, parse_profile

    def frames(ids: list[int], profile: str) -> list[bytes]:
        kv = prefill(loaded.model, ids)
        encoded = wire.encode(kv, parse_profile(profile), loaded.fingerprint, context=loaded.codec_context)
        return [frame.SerializeToString() for frame in encoded]

    text = loaded.config.get_text_config()
    heads = text.num_key_value_heads
    seq_len = 64  # a chunk of these tokens whose payload is past the cap: refused before its checksum or zstd
    positions = [torch.arange(seq_len).expand(heads, -1) for _ in range(text.num_hidden_layers)]
    oversized = wire.Encoder(loaded.fingerprint).header(seq_len, positions, parse_profile("int4"))
    payload = bytes(wire.MAX_CHUNK_BYTES + 1)
    chunk = wire.pb.Frame(chunk=wire.pb.Chunk(layer=0, token_start=0, token_end=seq_len, raw_size=4096,
                                              crc32c=wire.checksum(payload), payload=payload))
    try:
        pca = str(parse_profile("pca:b2:w:e").bind(loaded.codec_context))
    except ProfileError:  # no basis for this model: the derived-plan attack sends int4 groups instead
        pca = None
    return {"target": target, "token": token, "idle_s": idle_s, "kv_heads": heads,
            "fingerprint": loaded.fingerprint.SerializeToString(), "max_positions": text.max_position_embeddings,
            "seed": frames(list(range(300, 340)), "int8"), "other": frames(list(range(500, 520)), "int8"),
            "oversized": [oversized.SerializeToString(), chunk.SerializeToString()], "pca": pca}


class Attacker:
    """One hostile client: an authenticated stub (the token) and an anonymous one, on one channel."""

    def __init__(self, m: dict, rng: random.Random):
        from grpc_reflection.v1alpha import reflection_pb2_grpc

        from common.proto import kvwire_pb2 as pb
        from common.proto import kvwire_pb2_grpc as pb_grpc

        self.m, self.rng, self.pb = m, rng, pb
        size = 16 << 20
        self.channel = grpc.insecure_channel(m["target"], options=[("grpc.max_send_message_length", size),
                                                                   ("grpc.max_receive_message_length", size)])
        self.stub = pb_grpc.KVWireStub(self.channel)
        self.reflection = reflection_pb2_grpc.ServerReflectionStub(self.channel)
        self.auth = [("authorization", f"Bearer {m['token']}")]
        self.fingerprint = pb.Fingerprint.FromString(m["fingerprint"])
        self.seed = [pb.Frame.FromString(b) for b in m["seed"]]
        self.other = [pb.Frame.FromString(b) for b in m["other"]]
        self.big_question = "why? " * 1_600_000  # 8 MB
        self.long_id = "x" * (4 << 20)

    def renamed(self, frames, transfer_id: str | None = None):
        frames = [self.pb.Frame.FromString(f.SerializeToString()) for f in frames]
        frames[0].header.transfer_id = transfer_id or uuid.uuid4().hex
        return frames

    def call(self, function) -> str:
        try:
            function()
            return "OK"
        except grpc.RpcError as error:
            return error.code().name

    def transfer(self, frames, metadata="auth") -> str:
        metadata = self.auth if metadata == "auth" else None
        return self.call(lambda: self.stub.Transfer(iter(frames), timeout=CALL_TIMEOUT_S, metadata=metadata))

    def session(self) -> str | None:
        try:
            return self.stub.Transfer(iter(self.renamed(self.seed)), timeout=CALL_TIMEOUT_S, metadata=self.auth).session_id
        except grpc.RpcError:
            return None

    # --- the attacks: each returns the status names it got -----------------------------------------

    def unauthenticated(self) -> list[str]:
        from grpc_reflection.v1alpha import reflection_pb2

        frames = self.renamed(self.seed)
        return [self.transfer(frames, metadata=None),
                self.call(lambda: list(self.stub.TransferSegments(iter(frames), timeout=CALL_TIMEOUT_S))),
                self.call(lambda: self.stub.Generate(self.pb.GenerateRequest(session_id="x", token_ids=[1]),
                                                     timeout=CALL_TIMEOUT_S)),
                self.call(lambda: list(self.reflection.ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=CALL_TIMEOUT_S)))]

    def text_past_context(self) -> list[str]:
        n = self.m["max_positions"] + 1000
        frames = [self.pb.Frame(header=self.pb.Header(transfer_id=uuid.uuid4().hex, fingerprint=self.fingerprint,
                                                      seq_len=n, batch=1, segmented=True)),
                  self.pb.Frame(segment=self.pb.Segment(token_start=0, token_end=n, token_ids=[5] * n))]
        return [self.call(lambda: list(self.stub.TransferSegments(iter(frames), timeout=CALL_TIMEOUT_S,
                                                                  metadata=self.auth)))]

    def idle_stream(self) -> list[str]:
        release = threading.Event()

        def header_then_silence():
            yield self.renamed(self.seed)[0]
            release.wait(self.m["idle_s"] + 10)

        try:
            return [self.call(lambda: self.stub.Transfer(header_then_silence(), timeout=self.m["idle_s"] + 20,
                                                         metadata=self.auth))]
        finally:
            release.set()

    def huge_negotiate(self) -> list[str]:
        many = self.pb.NegotiateRequest(fingerprint=self.fingerprint, profiles=["int8" + "x" * 4000] * 1900)  # 7.6 MB
        junk = self.pb.NegotiateRequest(fingerprint=self.fingerprint, profiles=["q2c:" + "9" * 2040] * 64)
        return [self.call(lambda: self.stub.Negotiate(request, timeout=CALL_TIMEOUT_S, metadata=self.auth))
                for request in (many, junk)]

    def huge_question(self) -> list[str]:
        session = self.session() or "missing"
        request = self.pb.GenerateRequest(session_id=session, question=self.big_question)
        return [self.call(lambda: self.stub.Generate(request, timeout=CALL_TIMEOUT_S, metadata=self.auth))]

    def long_metadata(self) -> list[str]:
        request = self.pb.GenerateRequest(session_id="s" * 100_000, token_ids=[1])
        return [self.call(lambda: self.stub.Generate(request, timeout=CALL_TIMEOUT_S, metadata=self.auth))]

    def oversized_chunk(self) -> list[str]:
        header, chunk = (self.pb.Frame.FromString(b) for b in self.m["oversized"])
        header.header.transfer_id = uuid.uuid4().hex
        return [self.transfer([header, chunk])]

    def long_transfer_id(self) -> list[str]:
        return [self.transfer(self.renamed(self.seed, self.long_id))]

    def reused_id(self) -> list[str]:
        transfer_id = uuid.uuid4().hex
        codes = [self.transfer(self.renamed(self.seed, transfer_id)), self.transfer(self.renamed(self.other, transfer_id))]
        concurrent_id = uuid.uuid4().hex
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(self.transfer(self.renamed(self.seed, concurrent_id))))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return codes + results

    def non_finite(self) -> list[str]:
        numbers = [{"bandwidth_bps": float("nan")}, {"deadline_s": float("inf")}, {"quality_floor": float("nan")},
                   {"bandwidth_bps": -1.0}]
        return [self.call(lambda: self.stub.Negotiate(self.pb.NegotiateRequest(
            fingerprint=self.fingerprint, policy="auto", context_tokens=100, **n), timeout=CALL_TIMEOUT_S,
            metadata=self.auth)) for n in numbers]

    def derived_plans(self) -> list[str]:
        header = self.renamed(self.seed)[0]
        bits = f"{self.rng.uniform(0.5, 7.5):.6f}"
        if self.m["pca"]:
            header.header.profile = re.sub(r"pca:b[0-9.]+", f"pca:b{bits}", self.m["pca"])
        else:
            header.header.profile = f"int4:g{self.rng.choice([8, 16, 32, 64])}"
        return [self.transfer([header])]  # ends after the header: DATA_LOSS, the plan derived

    def never_asked(self) -> list[str]:
        return [self.transfer(self.renamed(self.seed))]

    def mutated(self) -> list[str]:
        from common import fuzz

        frames = fuzz.mutate(self.renamed(self.seed), self.rng, self.m["kv_heads"])
        if frames and frames[0].WhichOneof("kind") == "header" and frames[0].header.segmented:
            return [self.call(lambda: list(self.stub.TransferSegments(iter(frames), timeout=CALL_TIMEOUT_S,
                                                                      metadata=self.auth)))]
        return [self.transfer(frames)]


ATTACKS = ["unauthenticated", "text_past_context", "idle_stream", "huge_negotiate", "huge_question", "long_metadata",
           "oversized_chunk", "long_transfer_id", "reused_id", "non_finite", "derived_plans", "never_asked", "mutated"]


def attack(m: dict, attackers: int, seconds: float, out) -> None:
    """`attackers` clients looping over ATTACKS (each from its own place in the list) for `seconds`;
    puts {"codes": {attack: {status: count}}, "rounds": n} on `out`."""
    codes: dict[str, Counter] = {name: Counter() for name in ATTACKS}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    rounds = Counter()

    def client(index: int) -> None:
        attacker = Attacker(m, random.Random(index))
        step = index
        while time.monotonic() < stop_at:
            name = ATTACKS[step % len(ATTACKS)]
            step += 1
            try:
                got = getattr(attacker, name)()
            except Exception as exc:  # noqa: BLE001 - the attacker's own failure, counted, never silent
                got = [f"client error {type(exc).__name__}"]
            with lock:
                codes[name].update(got)
                rounds["attacks"] += 1

    threads = [threading.Thread(target=client, args=(i,)) for i in range(attackers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    out.put({"codes": {name: dict(counter) for name, counter in codes.items()}, "attacks": rounds["attacks"]})

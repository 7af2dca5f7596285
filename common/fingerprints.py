"""Which sender may talk to which receiver: the same weights, and a profile both dtypes can carry.

A fingerprint names the weights (architecture, dimensions, a hash of the weights) and, beside
them, the dtype the node computes in. The weights must match exactly. The dtypes may differ
(a CPU float32 sender and a CUDA bfloat16 receiver of the same model), except under a profile
that sends some layer `raw`: raw means the sender's own bits, which a receiver computing in
another dtype cannot take as they are.
"""

from __future__ import annotations

from common.plan import sends_raw as layer_sends_raw
from common.profile import Profile
from common.proto import kvwire_pb2 as pb

IDENTITY = ("architecture", "num_layers", "kv_heads", "head_dim", "weights_sha256")


def same_weights(a: pb.Fingerprint, b: pb.Fingerprint) -> bool:
    return all(getattr(a, name) == getattr(b, name) for name in IDENTITY)


def sends_raw(profile: Profile, num_layers: int) -> bool:
    """Whether any layer of `profile` travels in the sender's own dtype, bit for bit."""
    return any(layer_sends_raw(profile, layer) for layer in range(num_layers))


def refusal(sender: pb.Fingerprint, receiver: pb.Fingerprint, profile: Profile | None) -> str | None:
    """Why this receiver cannot take this sender's cache under `profile` (None: it can)."""
    if not same_weights(sender, receiver):
        return (f"model fingerprint mismatch: receiver runs {receiver.architecture} "
                f"({receiver.weights_sha256[:12]}), sender has {sender.architecture} ({sender.weights_sha256[:12]})")
    if profile is not None and sender.dtype != receiver.dtype and sends_raw(profile, receiver.num_layers):
        return (f"profile {profile} sends the sender's {sender.dtype} bits (raw), but this receiver computes in "
                f"{receiver.dtype}: use a cast (fp16, bf16) or a quantized profile")
    return None

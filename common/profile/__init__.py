"""The profile grammar: how a KV cache is compressed for the wire.

A profile is a list of stages. Every stage kind is a registered dataclass
(common.profile.registry) with named, documented fields; from that one registry come the compact
text form (`pca:b1.7:w:e:j:i1:f3+text`), the JSON long form ({"stages": [{"stage": "pca", ...}]}),
the docs' stage table (`kvwire profiles`), the error messages and the fuzzer's draws. Named
presets (`balanced`, ...) resolve into concrete profiles at the sender (common.profile.presets).

This package imports no torch: a profile parses and prints without it (a selection stage reads its
method's options from common.select, which does).
"""

from common.profile.grammar import parse_profile, profile_from_json
from common.profile.profile import MAX_PROFILE_CHARS, Profile
from common.profile.stage import ProfileError, Stage
from common.profile.stages.pca import PCA
from common.profile.stages.precision import Precision

__all__ = ["MAX_PROFILE_CHARS", "PCA", "Precision", "Profile", "ProfileError", "Stage", "parse_profile",
           "profile_from_json"]

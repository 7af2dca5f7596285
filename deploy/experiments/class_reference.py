"""pca:...:iG's step classes against the whole prompt's mean share of the question's attention (a reference
that does not depend on which tokens travel as text) or, as kvwire does, against the mean over the tokens that
travel as cache (docs/qwen.md, "+text:h"). Both at several rates, on SmolLM2 (float32, the CPU), SQuAD
questions and 2,048-token haystack prompts, with kvwire eval's harness; the variant is patched in for its run
only (the classes travel in the payload, so the receiver is the same).

    .venv/bin/python deploy/experiments/class_reference.py results/class_reference_smollm2.json [questions]
"""

import json
import sys

import torch

from channel.evaluation.harness import aggregate, evaluate
from channel.evaluation.longcontext import Haystack, needle_samples
from channel.evaluation.squad import load_squad
from common.models import load_model
from common.profile import parse_profile
from common.quant import transform
from common.quant.pca_entropy import MAX_CLASS

RATES = (1.2, 1.5, 1.7, 2.0)
SPEC = "pca:b{}:w:e:j:i1:f3+text:h:q"


def whole_prompt_classes(self, importance, positions):
    """LayerCodec.classes with the whole prompt's mean share as the reference."""
    if not self.per_token:
        return None
    share = importance.to(positions.device)[positions].mean(0).double().clamp(min=0)
    reference = float(importance.double().mean())
    share = share.clamp(min=1e-6 * reference + 1e-30)
    return (self.codec.strength * torch.log2(share / reference)).round().clamp(-self.codec.floor, MAX_CLASS).to(torch.int8)


def main(path: str, questions: int = 24) -> None:
    loaded = load_model("smollm2-135m", "cpu", "float32")
    sets = {"squad": load_squad(limit=questions),
            "haystack-2048": needle_samples(Haystack(loaded.tokenizer), 2048, [0.25, 0.5, 0.75])}
    profiles = [parse_profile(SPEC.format(rate)) for rate in RATES]
    rows = []
    for name, samples in sets.items():
        for reference, patch in (("cache tokens", None), ("whole prompt", whole_prompt_classes)):
            kept = transform.LayerCodec.classes
            if patch:
                transform.LayerCodec.classes = patch
            try:
                result = aggregate(evaluate(loaded, samples, profiles, max_new_tokens=16))
            finally:
                transform.LayerCodec.classes = kept
            for row in result:
                row.update(prompts=name, reference=reference)
                rows.append(row)
                print(name, reference, row["profile"], "bytes/fp16 %.4f fidelity %.3f KL tf %.4f" % (
                    row["ratio_vs_fp16"], row["fidelity_f1"], row["kl_tf"]), flush=True)
    document = dict(command=f"deploy/experiments/class_reference.py {path} {questions}",
                    environment=dict(device="CPU (the 2-core development machine)", dtype="float32"), rows=rows)
    with open(path, "w") as out:
        json.dump(document, out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:]))

"""How `+text:h` moves pca:...:iG's per-token step classes (docs/qwen.md): each context token's class taken
against the mean share of the question's attention over the whole context (the template's head included, as
when the head travels as cache) and over the context after the head (as under text:h), at i1:f3. SmolLM2,
float32 on the CPU: 3 SQuAD prompts and one 2,048-token haystack prompt, averaged over layers.

    .venv/bin/python deploy/experiments/text_head_classes.py results/text_head_classes_smollm2.json
"""

import json
import sys

from channel.evaluation.longcontext import Haystack, needle_samples
from channel.evaluation.squad import load_squad
from common.models import load_model
from common.profile import parse_profile
from common.prompts import build_prompt
from common.quant.pca_entropy import EntropyPCACodec
from sender.prefill import prefill_built

STRENGTH, FLOOR = 1.0, 3  # i1:f3


def main(path: str) -> None:
    loaded = load_model("smollm2-135m", "cpu", "float32")
    profile = parse_profile(f"pca:b1.7:w:e:j:i{STRENGTH:g}:f{FLOOR}")
    prompts = [("squad", s.context, s.question) for s in load_squad(limit=3)]
    prompts += [("haystack", s.context, s.question) for s in needle_samples(Haystack(loaded.tokenizer), 2048, [0.5])]
    steps = EntropyPCACodec(None, None, None, None, strength=STRENGTH, floor=FLOOR)  # classes() reads only these
    rows = []
    for name, context, question in prompts:
        prompt = build_prompt(loaded.tokenizer, context, question)
        pre = prefill_built(loaded, prompt, True, [profile])
        head, end = prompt.head_len, pre.context_len
        per_layer = []
        for share in pre.kv.importance:
            whole, after = steps.classes(share[:end])[head:].float(), steps.classes(share[head:end]).float()
            per_layer.append((float(share[:head].sum() / share[:end].sum()), float(whole.mean()), float(after.mean()),
                              float((whole == -FLOOR).float().mean()), float((after == -FLOOR).float().mean())))
        mean = [sum(values) / len(per_layer) for values in zip(*per_layer)]
        rows.append(dict(prompt=name, context_tokens=end, head_tokens=head, head_share_of_attention=mean[0],
                         mean_class_head_as_cache=mean[1], mean_class_head_as_text=mean[2],
                         at_floor_head_as_cache=mean[3], at_floor_head_as_text=mean[4]))
        print(rows[-1], flush=True)
    document = dict(command="deploy/experiments/text_head_classes.py " + path,
                    environment=dict(device="CPU (the 2-core development machine)", dtype="float32"), rows=rows)
    with open(path, "w") as out:
        json.dump(document, out, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])

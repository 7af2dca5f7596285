"""Q2C: attention from the question tokens to each context token."""

from dataclasses import dataclass

from common.select.base import ScoreInput, Selector


@dataclass
class Q2C(Selector):
    """Sum over question rows and heads of softmax attention; aggregated over all layers when global."""

    needs = ("question",)
    needs_question = True

    def score(self, inputs: ScoreInput, layer: int):
        return inputs.mass("question", layer)


@dataclass
class Q2CLast(Q2C):
    """Q2C with the last layer's attention only."""

    global_layers = "last"

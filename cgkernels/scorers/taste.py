"""The demo's taste reward as a scorer: defined only on captions of the demo world."""
from __future__ import annotations

import numpy as np

from cgkernels.scorers.common import Scorer, ScorerInputError


class TasteScorer(Scorer):
    name = "taste"

    def __call__(self, images, prompts) -> np.ndarray:
        from cgkernels.demo.reward import taste_rewards

        return taste_rewards([np.asarray(image.convert("RGB")) for image in images], prompts)

    def check_prompts(self, prompts) -> None:
        from cgkernels.demo.reward import parse_prompt

        for prompt in dict.fromkeys(prompts):
            try:
                parse_prompt(prompt)
            except ValueError:
                raise ScorerInputError(
                    f"scorer 'taste' is the demo's reward and scores only captions of the demo world, not {prompt!r}: "
                    "pass --scorer pickscore --pickscore-model DIR (or hpsv2, imagereward, aesthetic) for other "
                    "prompts") from None

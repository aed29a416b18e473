"""A reward for examples/policy-cliff.mk: a base reward plus a small, fixed, seeded
perturbation, so two runs see two nearly equal rewards (the Policy Cliff, ALGORITHMS.md
Part D §10: when optimal policies are not unique, a tiny reward change can flip the
learned policy; entropy regularisation makes the map continuous).

    r(x, y) = −len(y)/40 + NOISE · u(SEED, x, y),   u uniform in [−1, 1]

u is a hash of (seed, prompt, completion), so the perturbation is a fixed function of
the text (the same completion always gets the same reward), not fresh noise per call.
NOISE and SEED come from the environment (POLICY_CLIFF_NOISE, default 0.05;
POLICY_CLIFF_SEED, default 0). Used as `--reward python:examples/policy_cliff_reward.py:noisy`.
"""
from __future__ import annotations

import hashlib
import json
import os


def _text(c) -> str:
    return c if isinstance(c, str) else c[-1]["content"]


def perturbation(seed: int, prompt, completion: str) -> float:
    """u(seed, x, y) in [−1, 1]: a hash of the seed, the prompt and the completion."""
    key = json.dumps([seed, prompt, completion], ensure_ascii=False).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2 ** 63 - 1.0


def noisy(prompts, completions, **_):
    noise = float(os.environ.get("POLICY_CLIFF_NOISE", "0.05"))
    seed = int(os.environ.get("POLICY_CLIFF_SEED", "0"))
    return [-len(_text(c)) / 40.0 + noise * perturbation(seed, p, _text(c))
            for p, c in zip(prompts, completions)]

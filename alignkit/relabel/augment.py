"""`reward-augmented` (ALGORITHMS.md Part A §7): samples (paired best-worst first) or
scored pairs in; each pair becomes two: (a) `-a`, goal g = score of chosen, chosen ≻
rejected; (b) `-b`, goal g = score of rejected, **swapped** (old rejected is chosen).

The goal sentence (`GOAL_TEMPLATE`) goes into a system message (prepended, with a blank
line, to an existing first system message), or with `--no-system` in front of the
first user turn followed by a blank line (a string prompt stays a string). With
`--scale MIN:MAX` a score s maps to g = 1 + 9·(s − MIN)/(MAX − MIN), clamped to [1, 10];
g is rounded to 2 decimals and printed without decimals when whole. The records carry
`goal` and no `margin` (the swapped pair would have a negative one).

The records carry no `ref_logp_chosen` / `ref_logp_rejected`: those were computed for
the original prompt, and the prompt now holds the goal sentence, so the trainer
computes the reference log-probs itself. `finished_chosen` / `finished_rejected` stay
(they describe the completions, which are unchanged).
"""
from __future__ import annotations

from typing import Any

from ..errors import DataError, UsageError
from ..registry import Param
from .base import Strategy, is_num, strategy

GOAL_TEMPLATE = ("You are an assistant that generates responses for the instruction while "
                 "implicitly achieving the following target scores (on a scale of 1-10, where "
                 "1 is lowest and 10 is highest):\nOverall score: {g}.")

NO_SYSTEM = Param("no_system", bool, False, "Goal in front of the first user turn, not in a "
                  "system message.")
SCALE = Param("scale", str, None, "Map scores MIN..MAX onto the 1-10 goal scale.",
              metavar="MIN:MAX")


def format_goal(g: float) -> str:
    """Whole numbers without decimals (7, not 7.0); others as rounded (7.25)."""
    return str(int(g)) if float(g).is_integer() else f"{g:g}"


def goal_score(s: float, scale: tuple[float, float] | None) -> float | int:
    g = s if scale is None else 1 + 9 * (s - scale[0]) / (scale[1] - scale[0])
    if scale is not None:
        g = min(10.0, max(1.0, g))
    g = round(g, 2)
    return int(g) if float(g).is_integer() else g


def with_goal(prompt: Any, g: float, no_system: bool) -> Any:
    """The prompt with the reward-augmentation goal sentence (see the module docstring)."""
    text = GOAL_TEMPLATE.format(g=format_goal(g))
    if no_system:
        if isinstance(prompt, str):
            return f"{text}\n\n{prompt}"
        msgs = [dict(m) for m in prompt]
        for m in msgs:
            if m["role"] == "user":
                m["content"] = f"{text}\n\n{m['content']}"
                return msgs
        return [{"role": "user", "content": text}] + msgs
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else \
        [dict(m) for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{text}\n\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": text}] + msgs


def parse_scale(text: str | None) -> tuple[float, float] | None:
    """`MIN:MAX` -> (MIN, MAX), MIN < MAX (UsageError otherwise)."""
    if text is None:
        return None
    lo, _, hi = str(text).partition(":")
    try:
        scale = float(lo), float(hi)
    except ValueError:
        raise UsageError(f"--scale must look like MIN:MAX, got {text!r}") from None
    if not scale[0] < scale[1]:
        raise UsageError("--scale MIN:MAX needs MIN < MAX")
    return scale


def swap_sides(pair: dict) -> dict:
    """The pair with chosen and rejected (and every *_chosen / *_rejected field, and the
    sides of `p_win`) exchanged."""
    out = {}
    for k, v in pair.items():
        if k in ("chosen", "rejected"):
            k = "rejected" if k == "chosen" else "chosen"
        elif k.endswith("_chosen"):
            k = k[:-len("_chosen")] + "_rejected"
        elif k.endswith("_rejected"):
            k = k[:-len("_rejected")] + "_chosen"
        elif k == "p_win" and isinstance(v, dict):
            v = {"chosen": v.get("rejected"), "rejected": v.get("chosen")}
        out[k] = v
    order = ["id", "prompt", "chosen", "rejected"]
    return {**{k: out[k] for k in order}, **{k: v for k, v in out.items() if k not in order}}


@strategy("reward-augmented", "each pair becomes two, with the goal score in the prompt "
          "(the second swapped)", params=(NO_SYSTEM, SCALE))
class RewardAugmented(Strategy):
    inputs = ("samples", "pair")
    rewrites_text = True  # the goal sentence goes into the prompt

    @classmethod
    def given(cls, params: dict) -> dict:
        s = params.get("scale")
        if isinstance(s, (tuple, list)):  # the library's (MIN, MAX)
            params = {**params, "scale": f"{s[0]}:{s[1]}"}
        return params

    def check_options(self):
        self.scale = parse_scale(self.params["scale"])

    def record(self, rec, where):
        if "completions" in rec:
            pairs = self.best_worst(rec, where)
        else:
            for side in ("score_chosen", "score_rejected"):
                if not is_num(rec.get(side)):
                    raise DataError("missing required field (reward-augmented needs scored "
                                    "pairs)", *where, field=side)
            pairs = [rec] if self.keep_margin(rec["score_chosen"] - rec["score_rejected"]) else []
        out = []
        for pair in pairs:
            base = {k: v for k, v in pair.items() if k != "margin"}
            for suffix, p in (("a", base), ("b", swap_sides(base))):
                g = goal_score(p["score_chosen"], self.scale)
                out.append({**p, "id": f"{pair['id']}-{suffix}",
                            "prompt": with_goal(pair["prompt"], g, self.params["no_system"]),
                            "goal": g})
        return out

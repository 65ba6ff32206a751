"""Time and peak RSS of ``predict_file`` with and without one huge row, in a fresh process each.

    python bench/huge_row.py [--mb 20]      # PYTHONPATH=src; prints one line per input

The model is a tiny random-init Qwen2 with LoRA, exported as tests/test_export.py does; the inputs are its 24 rows,
and the same rows with one ``--mb`` MB row in the middle. Peak RSS is the child's ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
from loralab.inference import predict_file
t = time.perf_counter()
stats = predict_file(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu")
print(json.dumps({"seconds": round(time.perf_counter() - t, 2), "rows_kept": stats["rows_kept"],
                  "dropped": stats["dropped_by_reason"],
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=20, help="size of the huge row in MB")
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]
    from test_export import make_batch, meta, tiny_model

    from loralab.export import export_model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model, tokenizer, rows, _ = tiny_model(lora=True)
        export_model(
            model,
            tokenizer,
            tmp / "export",
            make_batch(tokenizer, rows[:8]),
            meta=meta(),
            base_location=None,
            save_base=True,
        )
        lines = [json.dumps({"id": r["id"], "features": r["features"]}) for r in rows]
        (tmp / "plain.jsonl").write_text("\n".join(lines) + "\n")
        lines.insert(len(lines) // 2, json.dumps({"id": "huge", "features": {"text": "ab " * (args.mb * 2**20 // 3)}}))
        (tmp / "huge.jsonl").write_text("\n".join(lines) + "\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
        for name in ("plain", "huge"):
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CHILD,
                        str(tmp / "export"),
                        str(tmp / f"{name}.jsonl"),
                        str(tmp / f"{name}.out.jsonl"),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            print(f"{name}: {out}")


if __name__ == "__main__":
    main()

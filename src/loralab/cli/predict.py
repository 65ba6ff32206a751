"""``loralab-predict model=<zip or dir> input=<jsonl|csv|parquet> output=<jsonl>``: score records with an exported
model."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence

from loralab.cli.args import Tool, option, run
from loralab.config.choices import DataFormat

DESCRIPTION = (
    "Score a JSONL file of {id, features} records (or a CSV/Parquet table: an id column, every other "
    "column but the label a feature) with an exported model (model_final.zip or a run dir "
    "with loralab.json). Rows are validated as in training: bad ones are counted by reason and left "
    "out, never fatal. Writes id, label and the calibrated probability of every label, in input order; a model "
    "exported with decision=precision writes the decided label and whether it abstained."
)


@dataclass
class ExportedModelArgs:
    """The options of every tool that loads an exported model (predict, evaluate)."""

    model: str = option(help="model_final.zip or a run dir with loralab.json")
    batch_size: int = option(64, "rows per forward pass; larger is faster until memory runs out")
    device: str = option("auto", "auto | cpu | cuda | cuda:1 ...")
    trust_remote_code: bool = option(False, "run code shipped with the model (only for models you trust)")
    format: DataFormat = option(DataFormat.auto, "input format: auto (by extension) | jsonl | csv | parquet")
    id_column: str | None = option(None, "CSV/Parquet id column; null: the one the model was trained with")
    label_column: str | None = option(None, "CSV/Parquet label column (never a feature); null: as in training")
    max_row_bytes: Optional[int] = option(
        None, "longer JSONL lines are dropped unread (row_too_large); null: the model's training value"
    )

    def __post_init__(self) -> None:  # checked before the model loads (a UsageError: one line, exit 2)
        if self.batch_size <= 0:
            raise ValueError(f"batch_size={self.batch_size}: must be > 0")
        if self.max_row_bytes is not None and self.max_row_bytes <= 0:
            raise ValueError(f"max_row_bytes={self.max_row_bytes}: must be > 0 or null")

    @property
    def columns(self) -> dict[str, str | None]:
        return {"format": str(self.format), "id_column": self.id_column, "label_column": self.label_column}


@dataclass
class PredictArgs(ExportedModelArgs):
    input: str = option(help='JSONL of {"id", "features"} rows, or CSV/Parquet (a label, if present, is ignored)')
    output: str = option(help="JSONL written with id, label, probs")


TOOL = Tool("loralab-predict", DESCRIPTION, PredictArgs)


def predict(args: PredictArgs) -> None:
    from loralab.inference import predict_file  # torch and transformers load only when there is work to do

    stats = predict_file(
        args.model,
        args.input,
        args.output,
        args.batch_size,
        args.device,
        args.trust_remote_code,
        args.columns,
        args.max_row_bytes,
    )
    print(
        f"scored {stats['rows_kept']} of {stats['rows_read']} rows in {stats['score_seconds']:.2f} s "
        f"({stats['rows_per_s']:.1f} rows/s) -> {stats['output']}"
        + (
            f"; probs: model + baseline blend, model weight {stats['blend_weight']:g}"
            if stats["blend_weight"] is not None
            else ""
        )
    )
    if stats["decided"] is not None:  # decision=precision: the thresholds exported with the model
        print(
            "decisions: "
            + ", ".join(f"{label} {n}" for label, n in stats["decided"].items())
            + f"; abstained (no label cleared its threshold) {stats['abstained']}"
        )
    if stats["rows_dropped"]:
        print(
            f"dropped {stats['rows_dropped']} rows: "
            + ", ".join(
                f"{reason}={n} (first at line {stats['first_line_by_reason'][reason]})"
                for reason, n in stats["dropped_by_reason"].items()
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    return run(TOOL, predict, argv)


if __name__ == "__main__":
    sys.exit(main())

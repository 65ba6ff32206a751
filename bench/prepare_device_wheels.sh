#!/usr/bin/env bash
# Wheels that a CUDA machine without network needs to run bench/device_check.py, into wheels/ (git-ignored).
#
#   bash bench/prepare_device_wheels.sh            # here, with network: ~25 MiB of wheels
#   # there (Python 3.12, torch/peft/accelerate/scikit-learn/h5py/pandas/pyarrow/safetensors installed):
#   python3 -m pip install -q --no-index --find-links wheels/ --target /tmp/site wheels/*.whl
#   PYTHONPATH=/tmp/site:src python3 bench/device_check.py --out $OUT
#
# What the machine lacks: hydra-core, omegaconf, antlr4-python3-runtime (sdist only: built into a wheel here),
# mlflow-skinny with the SQLite tracking store's packages (SQLAlchemy, alembic, Mako) and the dependencies of
# those the machine does not have, skops, and transformers at the version loralab is tested with (constraints.txt).
# Versions come from constraints.txt, so the device runs what CI ran. Wheels of packages the machine has (torch,
# numpy, scipy...) are removed: the folder travels with the checkout, 64 MiB at most.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT_DIR:-wheels}
PY=${PYTHON:-.venv/bin/python}
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
  --platform manylinux_2_34_x86_64 --platform manylinux_2_27_x86_64 --platform any)
rm -rf "$OUT" && mkdir -p "$OUT"

# antlr4-python3-runtime 4.9.3 (omegaconf's parser) exists only as an sdist: a pure-Python wheel built here
"$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$OUT" antlr4-python3-runtime==4.9.3

# the rest with their dependencies, at the tested versions; antlr is the wheel above
grep -v '^antlr4-python3-runtime' constraints.txt > "$OUT/.constraints.txt"
"$PY" -m pip download -q "${TARGET[@]}" -d "$OUT" -c "$OUT/.constraints.txt" --find-links "$OUT" \
  hydra-core omegaconf "mlflow-skinny==3.17.2" SQLAlchemy alembic skops "transformers==5.23.0"

# drop what the machine has (docs: /work/.library/device/KINDS.md's package list); keep transformers (newer there)
HAVE="torch numpy scipy scikit_learn pandas pyarrow h5py safetensors peft accelerate tokenizers huggingface_hub
packaging pyyaml PyYAML regex requests tqdm filelock fsspec typing_extensions jinja2 MarkupSafe markupsafe click
cloudpickle protobuf psutil joblib threadpoolctl certifi charset_normalizer idna urllib3 six python_dateutil pytz
tzdata anyio h11 httpx httpcore sniffio attrs pyparsing hf_xet zipp rich markdown_it_py mdurl pygments
shellingham typer annotated_doc networkx sympy mpmath triton nvidia werkzeug wrapt"
for name in $HAVE; do
  rm -f "$OUT/$name"-[0-9]*.whl
done
rm -f "$OUT"/nvidia_*.whl "$OUT/.constraints.txt"
ls "$OUT" && du -sh "$OUT"

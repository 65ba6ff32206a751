"""Score a JSONL with an exported model: python predict.py model=<zip or dir> input=<jsonl> output=<jsonl>."""

import sys

from loralab.cli.predict import main

if __name__ == "__main__":
    sys.exit(main())

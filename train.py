"""Train one experiment: python train.py [group=option] [key=value ...]; add -m for a sweep (= loralab-train)."""

from loralab.cli.train import entry

if __name__ == "__main__":
    entry()

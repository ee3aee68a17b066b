"""Train a discrete-memory model with the plain language-model loss (no teacher): ``dmt-train``.

python train.py swap=associative trainer.max_steps=500
"""

from dmt.distill.cli import train_main

if __name__ == "__main__":
    train_main()

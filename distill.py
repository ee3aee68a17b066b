"""Distil a causal LM into a student with kNN memory layers: ``dmt-distill``, runnable from a checkout.

python distill.py                                   # the embedded default (see README)
python distill.py swap=associative swap.store.capacity=200000 trainer.max_steps=500
python distill.py --multirun swap.read.topk=8,32
"""

from dmt.distill.cli import distill_main

if __name__ == "__main__":
    distill_main()

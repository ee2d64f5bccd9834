"""Data layer: chat templates and tokenization (`chat`), TFDS builders (`sft`), packing (`packing`) and
the per-host grain iterators the trainers use (`pipeline`).

Import the submodules directly (`from alignment.data import pipeline`); this package imports nothing
heavy by itself.
"""

"""Data layer: chat templates and tokenization (`chat`), TFDS builders (`sft`, `preference`), packing
(`packing`) and the per-host grain iterators the trainers use (`pipeline` for SFT rows,
`preference_pipeline` for preference pairs).

Import the submodules directly (`from alignment.data import pipeline`); this package imports nothing
heavy by itself.
"""

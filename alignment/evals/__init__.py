"""Evaluation: the alignment gym (`gym`: probes in six kinds from templates, train/test split by
template, TFDS builder `alignment_gym`, preference pairs for DPO, user probes from JSONL) and its
deterministic graders (`graders`: pass/fail per kind, per-kind Wilson intervals, and the helpful /
honest / harmless summary scores).

Import the submodules directly (`from alignment.evals import graders`); `graders` is pure Python,
`gym` imports tensorflow_datasets for its builder.
"""

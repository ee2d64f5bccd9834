"""The safety layers. `data`: real-world harmful, jailbreak and benign prompts in train / calibration /
held-out splits that share no behaviour or template (DATA.md)."""

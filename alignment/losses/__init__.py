"""Pure loss functions over per-token or per-sequence log-probabilities; no model, no trainer."""

"""JAX-native alignment research: SFT, reward modeling, DPO, PPO and GRPO on a sharded mesh."""

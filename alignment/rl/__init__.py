"""Online RL: rollouts from the in-JAX sampler, rewards by name, PPO with a value model and the critic-free GRPO
family, on the shared `alignment.train.run.Run`."""

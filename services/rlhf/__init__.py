"""RLHF service: reward models, the DPO family, PPO and GRPO (port 8400)."""

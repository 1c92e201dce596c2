"""PPO with a per-token KL penalty to a frozen reference (``tether ppo``)."""

from tether.ppo.trainer import SUMMARY_FILE, PPOConfig, PPOResult, PPOTrainer, list_checkpoints, run_ppo

__all__ = ["PPOConfig", "PPOTrainer", "PPOResult", "run_ppo", "list_checkpoints", "SUMMARY_FILE"]

"""tether: the classic RLHF pipeline (SFT -> reward model -> PPO with a KL tether, DPO, best-of-N)
on any Hugging Face causal language model."""

__version__ = "0.1.0"

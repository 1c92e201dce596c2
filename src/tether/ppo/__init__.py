"""PPO for RLHF (``tether ppo``): the public API.

``run_ppo(config, prompts=None, extra_metrics=None)`` is the command; ``PPOTrainer`` the loop
(``tether.ppo.trainer``), ``PPOConfig`` its options (``tether.ppo.config``). The parts: the equations
(``losses``, ``advantages``, ``kl_control``), the networks (``models``), experience making
(``rollout``), the output folder (``checkpoint``), metrics (``metrics``) and the KL health monitor
(``monitor``).
"""

from tether.ppo.checkpoint import SUMMARY_FILE
from tether.ppo.config import PPOConfig, PPOResult, PPOState
from tether.ppo.trainer import PPOTrainer, run_ppo

__all__ = ["PPOConfig", "PPOResult", "PPOState", "PPOTrainer", "SUMMARY_FILE", "run_ppo"]

"""The KL coefficient β: fixed, or adapted towards a target KL (Ziegler et al. 2019).

Units: the KL is the per-response **sum** of per-token KL, averaged over the rollout batch (nats
per response, measured at the sampling temperature, before the PPO update); ``n_steps`` is the
number of episodes in the (global) batch and ``horizon`` is in episodes. β is updated once per
rollout batch, after the PPO epochs.
"""

from __future__ import annotations


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, init_kl_coef: float):
        self.value = float(init_kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "fixed", "value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def adaptive_kl_update(beta: float, current_kl: float, target: float, n_steps: int, horizon: int) -> float:
    """One step of the Ziegler et al. (2019) proportional controller:

    e = clip(KL / target − 1, −0.2, 0.2)
    β ← β·(1 + e·n_steps / horizon)
    """
    error = min(max(current_kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


class AdaptiveKLController:
    """β moves towards the value that keeps the KL near ``target`` (see :func:`adaptive_kl_update`)."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0 episodes, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        self.value = adaptive_kl_update(self.value, current_kl, self.target, n_steps, self.horizon)
        return self.value

    def state_dict(self) -> dict:
        return {"kind": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = int(state.get("horizon", self.horizon))


def make_kl_controller(init_kl_coef: float, target_kl: float | None, horizon: int):
    """Fixed β when ``target_kl`` is None, the adaptive controller otherwise."""
    if target_kl is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target_kl, horizon)

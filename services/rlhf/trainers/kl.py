"""KL-penalty coefficient controllers for PPO (Ziegler et al. 2019, section 2.2).

The adaptive controller moves ``beta`` so that the measured KL(pi || ref) tracks ``target``:
``e = clip(KL / target - 1, -0.2, 0.2)``, ``beta <- beta * (1 + e * n_steps / horizon)``,
where ``n_steps`` is the number of samples (episodes) since the last update. Its whole
state is one float, saved in every checkpoint so that a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FixedKLController:
    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state(self) -> dict:
        return {"type": "fixed", "value": self.value}

    def restore(self, state: dict) -> None:
        self.value = float(state["value"])


@dataclass
class AdaptiveKLController:
    value: float
    target: float
    horizon: float

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state(self) -> dict:
        return {
            "type": "adaptive",
            "value": self.value,
            "target": self.target,
            "horizon": self.horizon,
        }

    def restore(self, state: dict) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(
    init_kl_coef: float, adaptive: bool, target: float, horizon: float
) -> KLController:
    if adaptive:
        return AdaptiveKLController(init_kl_coef, target, horizon)
    return FixedKLController(init_kl_coef)

"""KL health monitor: which band the policy's KL to the reference is in, and what to do about it.

The KL is the per-response sum of per-token KL (nats), averaged over the rollout batch and measured
at the sampling temperature, i.e. the ``kl/ref`` metric of ``tether ppo``. Bands from practice
(docs/ppo.md, "KL health"); the two gaps between the practitioners' bands are named here:

| KL (nats)   | band             | meaning / advice                                                                 |
|-------------|------------------|----------------------------------------------------------------------------------|
| < 1         | barely_changed   | policy barely changed: lower β or train longer                                   |
| 1 – 2       | moving           | the policy has started to move away from the reference: keep going              |
| 2 – 6       | healthy          | keep going                                                                       |
| 6 – 10      | elevated         | above the usual target: watch gold reward and samples; raise β if it keeps rising |
| 10 – 20     | drifting         | drifting from the SFT model: raise β or lower the learning rate; check gold reward |
| > 20        | divergence       | stop and debug (``--stop_on_divergence`` ends the run here)                     |

Boundaries belong to the lower band (KL = 2 is "moving", 6 is "healthy", 10 "elevated", 20 "drifting").
A negative k1 estimate (possible per batch) counts as "barely_changed".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KLBand:
    name: str
    upper: float  # inclusive upper bound in nats (inf for the last band)
    meaning: str
    advice: str


KL_BANDS: tuple[KLBand, ...] = (
    KLBand("barely_changed", 1.0, "policy barely changed", "lower β or train longer"),
    KLBand("moving", 2.0, "the policy has started to move", "keep going"),
    KLBand("healthy", 6.0, "healthy", "keep going"),
    KLBand(
        "elevated",
        10.0,
        "above the usual KL target",
        "watch the gold reward and samples; raise β if the KL keeps rising",
    ),
    KLBand(
        "drifting",
        20.0,
        "drifting from the SFT model",
        "raise β or lower the learning rate; check the gold reward (a KL penalty acts like early stopping)",
    ),
    KLBand("divergence", float("inf"), "divergence", "stop and debug"),
)
DIVERGENCE = "divergence"


def kl_band(kl: float) -> KLBand:
    """The band of a KL value (nats per response); NaN counts as divergence."""
    if kl != kl:  # NaN
        return KL_BANDS[-1]
    for band in KL_BANDS:
        if kl <= band.upper:
            return band
    return KL_BANDS[-1]


@dataclass
class MonitorReport:
    band: KLBand
    changed: bool
    should_stop: bool


class KLMonitor:
    """Follows the KL band across iterations, says so when it changes, and asks to stop at divergence."""

    def __init__(
        self,
        stop_on_divergence: bool = True,
        say: Callable[[str], None] | None = None,
        temperature: float | None = None,
    ):
        self.stop_on_divergence = stop_on_divergence
        self.say = say or logger.warning
        self.temperature = temperature
        self.band: str | None = None

    def update(self, kl: float, iteration: int | None = None) -> MonitorReport:
        band = kl_band(kl)
        changed = band.name != self.band
        self.band = band.name
        should_stop = band.name == DIVERGENCE and self.stop_on_divergence
        if changed:
            where = f"iteration {iteration}: " if iteration is not None else ""
            at_t = f" at T={self.temperature:g}" if self.temperature is not None else ""
            message = f"{where}KL to reference {kl:.2f} nats{at_t} -> {band.name} ({band.meaning}): {band.advice}"
            if should_stop:
                message += "; stopping (--stop_on_divergence), the last good checkpoint is kept"
            self.say(message)
        return MonitorReport(band, changed, should_stop)

    def state_dict(self) -> dict:
        return {"band": self.band}

    def load_state_dict(self, state: dict) -> None:
        self.band = state.get("band")

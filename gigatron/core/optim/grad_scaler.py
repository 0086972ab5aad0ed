"""Loss scalers for fp16 training.

The loss is multiplied by `scale` before backward; the optimizer divides the gradients by it again
(`inv_scale`) and skips the step when they hold Inf/NaN. `DynamicGradScaler` adapts the scale:
after `hysteresis` overflows (counted since the last growth) it multiplies the scale by
`backoff_factor` (not below `min_scale`); after `growth_interval` consecutive clean steps it
multiplies it by `growth_factor` and re-arms the hysteresis.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

__all__ = ["MegatronGradScaler", "ConstantGradScaler", "DynamicGradScaler"]


class MegatronGradScaler(ABC):
    """Base: holds the scale as a 1-element fp32 tensor on `device`."""

    def __init__(self, initial_scale: float, device: torch.device | str = "cpu") -> None:
        if initial_scale <= 0.0:
            raise ValueError(f"loss scale must be positive, got {initial_scale}.")
        self._scale = torch.tensor([float(initial_scale)], dtype=torch.float32, device=device)

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    @property
    def inv_scale(self) -> torch.Tensor:
        return self._scale.double().reciprocal().float()

    @abstractmethod
    def update(self, found_inf: bool) -> None:
        """Adjust the scale after a step whose gradients did (or did not) hold Inf/NaN."""

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The scaler's state for a checkpoint."""

    @abstractmethod
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what state_dict() returned."""


class ConstantGradScaler(MegatronGradScaler):
    """A fixed loss scale (--loss-scale)."""

    def update(self, found_inf: bool) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        return None


class DynamicGradScaler(MegatronGradScaler):
    """Dynamic loss scale with growth, backoff and hysteresis (Megatron's defaults: growth 2,
    backoff 0.5, --loss-scale-window growth interval, --hysteresis)."""

    def __init__(
        self,
        initial_scale: float,
        min_scale: float,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__(initial_scale, device)
        if not 0.0 < min_scale <= initial_scale:
            raise ValueError(f"need 0 < min_scale ({min_scale}) <= initial_scale ({initial_scale}).")
        if growth_factor <= 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}.")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}.")
        if growth_interval < 1 or hysteresis < 1:
            raise ValueError("growth_interval (--loss-scale-window) and --hysteresis must be >= 1.")
        self.min_scale = torch.tensor([float(min_scale)], dtype=torch.float32, device=device)
        self.growth_factor = torch.tensor([float(growth_factor)], dtype=torch.float32, device=device)
        self.backoff_factor = torch.tensor([float(backoff_factor)], dtype=torch.float32, device=device)
        self.growth_interval = int(growth_interval)
        self.hysteresis = int(hysteresis)
        self._growth_tracker = 0
        self._hysteresis_tracker = self.hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._growth_tracker = 0
            self._hysteresis_tracker -= 1
            if self._hysteresis_tracker <= 0:
                self._scale = torch.max(self._scale * self.backoff_factor, self.min_scale)
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._growth_tracker = 0
                self._hysteresis_tracker = self.hysteresis
                self._scale = self._scale * self.growth_factor

    def state_dict(self) -> dict[str, Any]:
        return {
            "scale": self._scale,
            "growth_tracker": self._growth_tracker,
            "hysteresis_tracker": self._hysteresis_tracker,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._scale = state_dict["scale"].to(device=self._scale.device, dtype=torch.float32).reshape(1).clone()
        self._growth_tracker = int(state_dict["growth_tracker"])
        self._hysteresis_tracker = int(state_dict["hysteresis_tracker"])

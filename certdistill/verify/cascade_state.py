"""The data of a certification cascade: its options, its per-sample state, its progress bar."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from certdistill.bounds.memory import check_memory_limit

__all__ = ["CascadeOptions", "CascadeState", "Progress"]


@dataclass(frozen=True)
class CascadeOptions:
    """Budgets and settings of the stages (validated where they enter).

    Attributes
    ----------
    timeout : float
        Seconds of branch and bound and MILP per sample; past it a sample stays ``unknown``.
    budget : float or None
        Seconds for the whole call; samples open when it runs out stay ``unknown``.
    attack_steps, attack_restarts : int
        PGD steps per restart and restarts of the ``"attack"`` stage.
    domain_batch : int
        Subdomains bounded at once by branch and bound (memory grows with it).
    max_domains : int
        Open subdomains kept at most by branch and bound.
    verbose : int
        A progress bar on stderr for the search stages when > 0.
    random_state : int
        Seed of the attack's random starts.
    memory_limit : int or None
        Bytes the bound stages may use: their samples per chunk (at most the cascade's batch
        size) and the groups of their backward passes are planned from it
        (:mod:`certdistill.bounds.memory`). ``None``: the device's default
        (:func:`~certdistill.bounds.memory.default_memory_limit`).
    """

    timeout: float = 10.0
    budget: float | None = None
    attack_steps: int = 50
    attack_restarts: int = 5
    domain_batch: int = 512
    max_domains: int = 200_000
    verbose: int = 0
    random_state: int = 0
    memory_limit: int | None = None

    def __post_init__(self):
        if not (
            isinstance(self.timeout, int | float)
            and math.isfinite(self.timeout)
            and self.timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}.")
        if self.budget is not None and not (
            isinstance(self.budget, int | float) and self.budget > 0
        ):
            raise ValueError(
                f"budget must be a positive number of seconds or None, got {self.budget!r}."
            )
        for name in ("attack_steps", "attack_restarts", "domain_batch", "max_domains"):
            value = getattr(self, name)
            if not (isinstance(value, int | np.integer) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        object.__setattr__(self, "memory_limit", check_memory_limit(self.memory_limit))


@dataclass
class CascadeState:
    """Per-sample results of a cascade, filled stage by stage."""

    reference: Tensor
    margins: Tensor
    decided: Tensor  # stage index that settled the sample, -1 if none
    falsified: Tensor
    counterexample: Tensor
    open_rows: Tensor
    extras: dict = field(default_factory=dict)

    @property
    def certified(self) -> Tensor:
        return (self.decided >= 0) & ~self.falsified


class Progress:
    """A tqdm bar of decided samples (nothing when ``verbose`` is 0)."""

    def __init__(self, total: int, description: str, verbose: int):
        self.total, self.description, self.verbose = total, description, verbose
        self.bar = None

    def __enter__(self):
        if self.verbose > 0:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total,
                desc=self.description,
                unit="sample",
                leave=False,
                dynamic_ncols=True,
            )
        return self

    def __call__(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(max(0, done - self.bar.n))

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

"""Optional backend: the same margin bounds computed by auto_LiRPA.

auto_LiRPA is not a dependency. Its 2022 PyPI release does not import with torch 2 or numpy 2;
its repository's newer releases do. This adapter exists so that certdistill can certify modules
its native engine does not support, and so that the test suite can check the native engine
against an independent implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from certdistill.bounds.engine import METHOD_TABLE, BoundResult
from certdistill.bounds.perturbation import Perturbation
from certdistill.bounds.specification import margin_specification

INSTALL_HINT = (
    "backend='auto_lirpa' needs the auto_LiRPA package, which could not be imported. "
    "The PyPI release (0.3) does not work with torch 2 or numpy 2; install a current release "
    "from its repository instead: "
    "pip install 'auto_LiRPA @ git+https://github.com/Verified-Intelligence/auto_LiRPA' "
    "(it declares torch < 2.9)."
)


def import_auto_lirpa():
    """Return the auto_LiRPA module, or raise ImportError with how to install it."""
    try:
        import auto_LiRPA
    except Exception as error:  # noqa: BLE001 - a broken install fails with many error types
        raise ImportError(f"{INSTALL_HINT} (import failed with: {error!r})") from error
    return auto_LiRPA


class LirpaBounds:
    """auto_LiRPA counterpart of :class:`certdistill.bounds.BoundEngine`.

    Parameters
    ----------
    module : torch.nn.Module
        Any module auto_LiRPA can trace; it should be in eval mode.
    bound_opts : dict, optional
        Passed to ``auto_LiRPA.BoundedModule``.
    """

    def __init__(self, module: nn.Module, bound_opts: dict | None = None):
        self.lirpa = import_auto_lirpa()
        self.module = module
        self.bound_opts = bound_opts
        self._bounded = None

    def _bounded_module(self, example: Tensor):
        if self._bounded is None:
            self._bounded = self.lirpa.BoundedModule(
                self.module, example[:1], bound_opts=self.bound_opts, device=example.device
            )
        # auto_LiRPA traces Dropout in train mode; bounds must describe the eval-mode network.
        self._bounded.eval()
        return self._bounded

    def bound(
        self,
        x: Tensor,
        perturbation: Perturbation,
        reference: Tensor | None = None,
        *,
        method: str = "crown",
        **_,
    ) -> BoundResult:
        """Clean logits and margin lower bounds, as :meth:`BoundEngine.bound`."""
        bounded = self._bounded_module(x)
        lower, upper = perturbation.bounds(x)
        lirpa_perturbation = self.lirpa.PerturbationLpNorm(norm=float("inf"), x_L=lower, x_U=upper)
        bounded_x = self.lirpa.BoundedTensor(x, lirpa_perturbation)
        with torch.no_grad():
            logits = self.module(x)
        if reference is None:
            reference = logits.argmax(1)
        n_classes = logits.shape[1]
        spec = margin_specification(reference, n_classes, dtype=x.dtype)
        # alpha-CROWN optimises slopes by gradient descent even when certifying.
        with torch.enable_grad():
            margins, _ = bounded.compute_bounds(
                x=(bounded_x,),
                C=spec,
                method=METHOD_TABLE[method].lirpa_name,
                bound_upper=False,
            )
        ref_column = torch.nn.functional.one_hot(reference, n_classes).bool()
        return BoundResult(
            logits, reference, margins.detach().masked_fill(ref_column, float("inf"))
        )

    def margin_lower_bounds(
        self,
        x: Tensor,
        perturbation: Perturbation,
        reference: Tensor,
        *,
        method: str = "crown",
        **options,
    ) -> Tensor:
        """Margin lower bounds, as :meth:`BoundEngine.margin_lower_bounds`."""
        return self.bound(x, perturbation, reference, method=method, **options).margins

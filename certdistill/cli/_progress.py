"""A progress bar per fit (tqdm, on stderr) for the command line."""

from __future__ import annotations

import sys
import time
import warnings

from skorch.callbacks import Callback

__all__ = ["FitProgress", "fit_with_progress"]


class FitProgress(Callback):
    """skorch callback showing one tqdm bar over the epochs of a fit, with loss and eps.

    skorch's own ``ProgressBar`` draws one bar per epoch; one bar per fit keeps the terminal
    readable when several models are trained in a row.

    Parameters
    ----------
    desc : str, default="fit"
        Label in front of the bar.
    disable : bool, default=False
        Draw nothing.
    """

    def __init__(self, desc: str = "fit", disable: bool = False):
        self.desc = desc
        self.disable = disable

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        from tqdm import tqdm

        self.bar_ = tqdm(
            total=getattr(net, "n_epochs_", net.max_epochs),
            desc=self.desc,
            unit="epoch",
            file=sys.stderr,
            leave=True,
            disable=self.disable,
            dynamic_ncols=True,
            mininterval=0.5,
        )

    def on_epoch_end(self, net, **kwargs):
        row = net.history[-1]
        postfix = {"loss": f"{row['train_loss']:.3f}"} if "train_loss" in row else {}
        if "eps" in row:
            postfix["eps"] = f"{row['eps']:.3g}"
        self.bar_.set_postfix(postfix, refresh=False)
        self.bar_.update()

    def on_train_end(self, net, X=None, y=None, **kwargs):
        self.bar_.close()

    def __getstate__(self):
        # A tqdm bar cannot be pickled; it only lives during a fit.
        state = self.__dict__.copy()
        state.pop("bar_", None)
        return state


def fit_with_progress(model, X, y, desc: str, *, quiet: bool = False) -> float:
    """Fit ``model`` on ``X``, ``y`` with a :class:`FitProgress` bar; return the seconds taken.

    The callback is removed after the fit, so that a saved model does not carry it.

    Raises
    ------
    KeyboardInterrupt
        If the fit was interrupted (skorch stops training on Ctrl-C without raising).
    """
    original = model.callbacks
    model.set_params(callbacks=[*(original or []), ("cli_progress", FitProgress(desc, quiet))])
    try:
        start = time.perf_counter()
        with warnings.catch_warnings():
            # the command reports an interruption itself ("certdistill: interrupted")
            warnings.filterwarnings("ignore", message=".*interrupted", category=UserWarning)
            model.fit(X, y)
        seconds = time.perf_counter() - start
    finally:
        model.set_params(callbacks=original)
    history = model.history_
    if len(history) < getattr(model, "n_epochs_", model.max_epochs) or (
        len(history) and history[-1].get("interrupted")
    ):
        # skorch ends a fit quietly on Ctrl-C; the command must stop too, not save a model
        # trained for part of its epochs as if it were complete.
        raise KeyboardInterrupt
    return seconds

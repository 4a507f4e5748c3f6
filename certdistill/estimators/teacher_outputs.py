"""What a student sees of its teacher: clean logits and worst-case logits, cached.

The teacher is fixed while a student trains, so its outputs on a training sample depend only on
the sample and, for the worst case, on the radius. :class:`TeacherOutputs` computes them without
gradients in eval mode and keeps them:

* **on a bound training set** (:meth:`TeacherOutputs.bind`, what ``DistilledStudent.fit`` does):
  the clean logits of every training row are computed once, in bulk (no gradients, chunks of
  ``bulk_rows`` rows), and the worst-case logits of every row once per radius *level*: the
  steps of :meth:`TeacherOutputs.rounded_up` while eps ramps, and the final radius after the
  ramp. Batches look their rows up by index (the student's batches carry their row indices,
  see :class:`~certdistill.estimators.base.TensorBatches`), so a cached epoch costs one gather. A
  radius
  off the levels (the exact radius of each batch of the ramp, ``levels=None``) is computed for
  its batch only, as it serves no other batch. These whole-set outputs are also shared between
  fits (grid-search candidates, repeated fits) that distil from the same fitted teacher on the
  same data: a per-teacher cache keyed by the teacher's module and a fingerprint of its
  weights, a fingerprint of the training rows and labels, the bound method and the
  perturbation (radius and domain). A refitted teacher (new module or new weights) or other
  data miss it. PGD worst cases (``bounds="pgd"``) are random: they are computed batch by batch
  and kept for the fit only, as before, so that the random stream and the results of a fit do
  not depend on earlier fits.
* **otherwise** (a batch without row indices: validation batches, direct calls), per sample,
  keyed by the sample's bytes and label: clean logits for the whole fit, worst-case logits for
  as long as the radius stays the same.

While eps ramps, the radius changes at every batch; :meth:`TeacherOutputs.rounded_up` gives the
radius rounded up to one of ``levels`` equal steps of a ceiling radius, at which each step is
computed once per sample, and whose ball still contains the student's (the teacher's worst case
over it bounds the teacher's worst case over the student's ball).
"""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from certdistill.bounds import METHODS, Perturbation, engine_for
from certdistill.certification.certify import eval_mode
from certdistill.estimators.losses import worst_case_logits
from certdistill.verify.attacks import pgd_attack

__all__ = ["SHARED_CACHE_BYTES", "TEACHER_BOUNDS", "TeacherOutputs", "clear_shared_cache"]

#: ``"best"``: per margin, the larger of these sound bounds.
_BEST = ("ibp", "crown-ibp")

TEACHER_BOUNDS = (*METHODS, "best", "pgd")
"""Ways of computing the teacher's worst-case logits: a bound method of the engine (a certified
teacher; ``"best"`` is the larger of the IBP and CROWN-IBP margin bounds, both sound) or a PGD
attack on the teacher (an adversarially trained teacher, whose bounds are vacuous)."""


#: Rows per teacher call of the bulk computations (per device type; on CPU, chunks that stay in
#: cache measured fastest, on a GPU large ones).
BULK_ROWS = {"cpu": 128, "cuda": 4096}
_BULK_ROWS_DEFAULT = 1024

SHARED_CACHE_BYTES = 512 * 2**20
"""Most bytes of whole-training-set teacher outputs kept per teacher between fits (least
recently used first out); 0 disables sharing between fits."""


def _radius_key(perturbation: Perturbation) -> bytes:
    return perturbation.eps.detach().cpu().numpy().tobytes()


def _tensor_bytes(tensor: Tensor | None) -> bytes:
    if tensor is None:
        return b"-"
    array = tensor.detach().cpu().contiguous().numpy()
    return f"{array.dtype}{array.shape}".encode() + array.tobytes()


def _perturbation_key(perturbation: Perturbation) -> bytes:
    """Radius and domain (what a cached worst case depends on besides the rows and labels)."""
    return b"|".join(
        [
            _tensor_bytes(perturbation.eps),
            _tensor_bytes(perturbation.lower),
            _tensor_bytes(perturbation.upper),
            repr(tuple(perturbation.sample_shape)).encode(),
        ]
    )


def _digest_tensor(digest, tensor: Tensor) -> None:
    array = tensor.detach().cpu().contiguous().numpy()
    digest.update(f"{array.dtype}{array.shape}".encode())
    digest.update(array.reshape(-1).view(np.uint8))  # the buffer itself: no copy


def _fingerprint(tensor: Tensor) -> bytes:
    digest = hashlib.blake2b(digest_size=20)
    _digest_tensor(digest, tensor)
    return digest.digest()


def _teacher_fingerprint(teacher) -> bytes:
    """The teacher's weights and buffers, input shape, device and type: what its outputs
    depend on."""
    module = teacher.module_
    digest = hashlib.blake2b(digest_size=20)
    device = next(iter(module.parameters()), torch.empty(0)).device
    digest.update(
        f"{type(module).__module__}.{type(module).__qualname__}"
        f"{teacher._module_sample_shape()}{device}".encode()
    )
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        _digest_tensor(digest, tensor)
    return digest.digest()


class _SharedOutputs:
    """Whole-training-set teacher outputs per teacher module (weakly held: they go with the
    module), least recently used first out beyond :data:`SHARED_CACHE_BYTES` per module."""

    def __init__(self):
        self._lock = threading.Lock()
        self._by_module: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, module, key) -> Tensor | None:
        with self._lock:
            entries = self._by_module.get(module)
            if entries is None or key not in entries:
                return None
            entries.move_to_end(key)
            return entries[key]

    def put(self, module, key, value: Tensor) -> None:
        limit = int(SHARED_CACHE_BYTES)
        size = value.numel() * value.element_size()
        if size > limit:
            return
        with self._lock:
            entries = self._by_module.setdefault(module, OrderedDict())
            entries[key] = value
            entries.move_to_end(key)
            total = sum(v.numel() * v.element_size() for v in entries.values())
            while total > limit:
                _, dropped = entries.popitem(last=False)
                total -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        with self._lock:
            self._by_module.clear()


_SHARED = _SharedOutputs()


def clear_shared_cache() -> None:
    """Forget the teacher outputs kept between fits (:class:`TeacherOutputs` with ``share``)."""
    _SHARED.clear()


def _on_batch_device(
    logits: Tensor, worst: Tensor | None, x: Tensor, y: Tensor, worst_case: bool
) -> tuple[Tensor, Tensor | None]:
    """The outputs on the batch's device; without a worst case (eps 0) the clean logits
    shifted so that the label's is 0, where one is wanted."""
    logits = logits.to(x.device)
    if worst is not None:
        return logits, worst.to(x.device)
    return logits, (logits - logits.gather(1, y[:, None]) if worst_case else None)


def _sample_keys(x: Tensor, y: Tensor) -> list[int]:
    rows = x.detach().reshape(x.shape[0], -1).cpu().numpy()
    return [hash((row.tobytes(), label)) for row, label in zip(rows, y.tolist(), strict=True)]


@dataclass
class TeacherOutputs:
    """Clean and worst-case logits of a fitted teacher, computed without gradients and cached.

    Parameters
    ----------
    teacher : CertifiedNetBase
        The fitted teacher.
    bounds : str
        How the worst-case logits are computed (one of :data:`TEACHER_BOUNDS`).
    pgd_steps : int, default=10
        Steps of the attack when ``bounds="pgd"``.
    cache : bool, default=True
        Keep outputs (per bound training row, or per sample; see the module docstring). False:
        every batch is computed.
    ceiling : Perturbation or None, default=None
        The largest radius (the student's final training perturbation); with ``levels``,
        :meth:`rounded_up` rounds radii up to it to ``levels`` equal steps of it.
    levels : int or None, default=None
        Number of steps of ``ceiling`` (``None``: the worst case at each batch's exact radius).
    share : bool, default=True
        Share the outputs on a bound training set with other fits from the same teacher on the
        same rows (deterministic bound methods only, not ``"pgd"``).
    bulk_rows : int or None, default=None
        Rows per teacher call of the whole-set computations (``None``: ``BULK_ROWS`` of the
        teacher's device type).

    Attributes
    ----------
    hits, misses : int
        Batches served from the cache and computed.
    bulk_passes : int
        Whole-set computations (one for the clean logits, one per radius level).
    shared_hits : int
        Whole-set outputs taken from an earlier fit.
    """

    teacher: object
    bounds: str
    pgd_steps: int = 10
    cache: bool = True
    ceiling: Perturbation | None = None
    levels: int | None = None
    share: bool = True
    bulk_rows: int | None = None
    hits: int = 0
    misses: int = 0
    bulk_passes: int = 0
    shared_hits: int = 0
    _clean: dict = field(default_factory=dict, repr=False)
    _worst: dict = field(default_factory=dict, repr=False)
    _worst_radius: object = field(default=None, repr=False)
    _rows: dict | None = field(default=None, repr=False)

    # ------------------------------------------------------------------- calls
    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        perturbation: Perturbation,
        *,
        worst_case: bool = True,
        cache: bool = True,
        rows: Tensor | None = None,
    ):
        """Teacher logits of a batch of student inputs.

        Parameters
        ----------
        x : Tensor
            Student module inputs (flattened and reshaped to the teacher's input).
        y : LongTensor
            Encoded labels (reference class of the worst case).
        perturbation : Perturbation
            The student's perturbation of the batch (its samples, its domain); radius 0 gives
            ``t - t_y``.
        worst_case : bool, default=True
            Also compute the worst-case logits (``None`` is returned otherwise).
        cache : bool, default=True
            Look the batch up in (and add it to) the cache; False for inputs seen once, such as
            attacked points.
        rows : LongTensor or None, default=None
            Indices of the batch's samples among the rows given to :meth:`bind` (the batch
            must be those rows, with their labels): they are looked up by index in the
            whole-set outputs. ``None``: per-sample keys.

        Returns
        -------
        logits : Tensor
            Clean teacher logits ``t(x)`` on ``x``'s device.
        worst : Tensor or None
            Worst-case logits: minus the teacher's margin lower bounds (``bounds`` a bound
            method) or the attacked logits shifted so that the label's is 0 (``"pgd"``).
        """
        if rows is not None and self.cache and cache and self._bound_rows(rows, y):
            return self._indexed(x, y, perturbation, worst_case, rows)
        keys = _sample_keys(x, y) if self.cache and cache else None
        logits = self._lookup(self._clean, keys)
        worst = None
        radius = _radius_key(perturbation)
        want_worst = worst_case and perturbation.level > 0.0
        if want_worst:
            if self._worst_radius != radius:
                self._worst, self._worst_radius = {}, radius
            worst = self._lookup(self._worst, keys)
        if logits is None or (want_worst and worst is None):
            self.misses += 1
            logits, worst = self._compute(x, y, perturbation, want_worst)
            if keys is not None:
                self._clean.update(zip(keys, logits.cpu(), strict=True))
                if want_worst:
                    self._worst.update(zip(keys, worst.cpu(), strict=True))
        else:
            self.hits += 1
        return _on_batch_device(logits, worst, x, y, worst_case)

    def rounded_up(self, perturbation: Perturbation) -> Perturbation:
        """The perturbation the worst case is computed at: ``perturbation`` itself, or (with
        ``levels``) the smallest of the steps ``k / levels * ceiling`` whose radius is at least
        the batch's everywhere (checked per feature, so the step's ball contains the batch's)."""
        if self.levels is None or self.ceiling is None or perturbation.per_sample:
            return perturbation
        top = self.ceiling.level
        fraction = perturbation.level / top if top > 0.0 else math.inf
        if not 0.0 < fraction <= 1.0:
            return perturbation
        eps = perturbation.eps.to(self.ceiling.eps.device)
        # The first candidate is right unless float error made it one step too low.
        for step in range(max(1, math.ceil(fraction * self.levels)), self.levels + 1):
            rounded = self.ceiling.scaled(step / self.levels)
            if bool((rounded.eps >= eps).all()):
                return rounded.to(device=perturbation.eps.device)
        return perturbation

    # ------------------------------------------------------ bound training set
    def bind(self, X, y) -> TeacherOutputs:
        """Register the training rows (flat inputs, all of them, in the order that batch
        ``rows`` index) and their encoded labels: their outputs are then computed for the whole
        set at once and looked up by row (see :meth:`__call__`).

        Parameters
        ----------
        X : ndarray or Tensor of shape (n, n_features)
        y : ndarray or Tensor of shape (n,)

        Returns
        -------
        self
        """
        inputs = torch.as_tensor(np.ascontiguousarray(X) if isinstance(X, np.ndarray) else X)
        labels = torch.as_tensor(np.asarray(y) if not isinstance(y, Tensor) else y).long()
        inputs = inputs.detach().reshape(len(inputs), -1)
        if len(labels) != len(inputs):
            raise ValueError(f"bind got {len(inputs)} rows but {len(labels)} labels.")
        self._rows = {
            "X": inputs,
            "y": labels.reshape(-1),
            "tables": {},
            "grid": self._grid(),
            "key": None,
            "source": X,
        }
        return self

    def is_bound_to(self, X) -> bool:
        """Whether :meth:`bind` was given this very array (or tensor)."""
        return self._rows is not None and self._rows["source"] is X

    def unbind(self) -> None:
        """Drop the bound rows and their outputs (the shared ones stay shared)."""
        self._rows = None

    def _grid(self) -> set:
        """Radius keys computed for the whole set: the levels of :meth:`rounded_up` and the
        ceiling (the radius after the ramp)."""
        if self.ceiling is None:
            return set()
        grid = {_radius_key(self.ceiling)}
        if self.levels is not None:
            grid |= {
                _radius_key(self.ceiling.scaled(step / self.levels))
                for step in range(1, int(self.levels) + 1)
            }
        return grid

    def _bound_rows(self, rows: Tensor, y: Tensor) -> bool:
        """Whether ``rows`` index the bound rows, with labels ``y``."""
        bound = self._rows
        if bound is None or rows.dim() != 1 or len(rows) != len(y):
            return False
        rows = rows.cpu()
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= len(bound["y"])):
            return False
        return torch.equal(bound["y"][rows], y.detach().cpu().reshape(-1).long())

    def _indexed(self, x, y, perturbation, worst_case: bool, rows: Tensor):
        rows = rows.cpu()
        logits = self._whole_set(None).index_select(0, rows.to(self._table_device()))
        worst = None
        computed = False
        if worst_case and perturbation.level > 0.0:
            radius = _radius_key(perturbation)
            if self.bounds == "pgd":
                worst, computed = self._pgd_rows(x, y, perturbation, rows, radius)
            elif radius in self._rows["grid"] and not perturbation.per_sample:
                worst = self._whole_set(perturbation).index_select(0, rows.to(self._table_device()))
            else:  # a radius of this batch only (the exact ramp): nothing to reuse
                computed = True
                _, worst = self._compute(x, y, perturbation, True, clean=False)
        self.misses += computed
        self.hits += not computed
        return _on_batch_device(logits, worst, x, y, worst_case)

    def _table_device(self) -> torch.device:
        return next(iter(self.teacher.module_.parameters()), torch.empty(0)).device

    def _whole_set(self, perturbation: Perturbation | None) -> Tensor:
        """Clean logits (``None``) or worst-case logits at ``perturbation`` of every bound
        row: from this fit's table, the shared cache, or computed in bulk."""
        bound = self._rows
        tables = bound["tables"]
        name = b"clean" if perturbation is None else _perturbation_key(perturbation)
        if name in tables:
            return tables[name]
        share = self.share and self.bounds != "pgd" and SHARED_CACHE_BYTES > 0
        module = self.teacher.module_
        key = table = None
        if share:
            if bound["key"] is None:
                bound["key"] = (
                    _teacher_fingerprint(self.teacher),
                    _fingerprint(bound["X"]),
                    _fingerprint(bound["y"]),
                )
            teacher_key, x_key, y_key = bound["key"]
            key = (
                (teacher_key, x_key, b"clean")
                if perturbation is None
                else (teacher_key, x_key, y_key, self.bounds, name)
            )
            table = _SHARED.get(module, key)
            if table is not None:
                self.shared_hits += 1
                table = table.to(self._table_device())
        if table is None:
            table = self._bulk(perturbation)
            if share:
                _SHARED.put(module, key, table.cpu())
        if perturbation is not None:  # keep one radius at a time, as the per-sample cache
            for old in [k for k in tables if k != b"clean"]:
                del tables[old]
        tables[name] = table
        return table

    def _bulk(self, perturbation: Perturbation | None) -> Tensor:
        """Clean or worst-case logits of every bound row, ``bulk_rows`` rows per call."""
        self.bulk_passes += 1
        bound = self._rows
        device = self._table_device()
        chunk = self.bulk_rows or BULK_ROWS.get(device.type, _BULK_ROWS_DEFAULT)
        parts = []
        for start in range(0, len(bound["X"]), int(chunk)):
            x = bound["X"][start : start + int(chunk)]
            y = bound["y"][start : start + int(chunk)]
            logits, worst = self._compute(
                x, y, perturbation, perturbation is not None, clean=perturbation is None
            )
            parts.append(logits if perturbation is None else worst)
        return torch.cat(parts)

    def _pgd_rows(self, x, y, perturbation, rows: Tensor, radius: bytes):
        """PGD worst cases of a batch: kept per row for the radius (random: computed batch by
        batch, as the per-sample cache does)."""
        bound = self._rows
        state = bound["tables"].get(b"pgd")
        if state is None or state[0] != radius:
            n_classes = self._whole_set(None).shape[1]
            state = (
                radius,
                torch.zeros(len(bound["y"]), n_classes, device=self._table_device()),
                torch.zeros(len(bound["y"]), dtype=torch.bool),
            )
            bound["tables"][b"pgd"] = state
        _, table, done = state
        if bool(done[rows].all()):
            return table.index_select(0, rows.to(table.device)), False
        _, worst = self._compute(x, y, perturbation, True, clean=False)
        table[rows.to(table.device)] = worst.to(table.device)
        done[rows] = True
        return worst, True

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _lookup(store: dict, keys) -> Tensor | None:
        if keys is None or not store:
            return None
        try:
            return torch.stack([store[key] for key in keys])
        except KeyError:
            return None

    def _compute(
        self,
        x: Tensor,
        y: Tensor,
        perturbation: Perturbation | None,
        want_worst: bool,
        *,
        clean: bool = True,
    ):
        """Clean logits (``clean``; else None) and worst-case logits (``want_worst``; else
        None) of a batch."""
        teacher = self.teacher
        module = teacher.module_
        xt = teacher.module_input(x.detach().reshape(x.shape[0], -1))
        yt = y.to(xt.device)
        logits = worst = None
        with eval_mode(module):
            if clean:
                with torch.no_grad():
                    logits = module(xt)
            if want_worst:
                around = perturbation.reshaped(xt.shape[1:]).to(device=xt.device, dtype=xt.dtype)
            if want_worst and self.bounds == "pgd":
                x_adv = pgd_attack(module, xt, yt, around, steps=int(self.pgd_steps))
                with torch.no_grad():
                    attacked = module(x_adv)
                worst = attacked - attacked.gather(1, yt[:, None])
            elif want_worst:
                engine = engine_for(module)
                methods = _BEST if self.bounds == "best" else (self.bounds,)
                with torch.no_grad():
                    margins = torch.stack(
                        [
                            engine.margin_lower_bounds(xt, around, yt, method=method)
                            for method in methods
                        ]
                    ).amax(0)
                worst = worst_case_logits(margins)
        return logits, worst

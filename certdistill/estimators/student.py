"""``DistilledStudent``: a certified student trained by IBP with a certified teacher's guidance."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from certdistill.estimators.base import (
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    CertifiedNetBase,
    Choice,
    Range,
    Subset,
)
from certdistill.estimators.distillation import DISTILLATION_LOSSES, DistillationBatch
from certdistill.estimators.guidance import TeacherGuidance
from certdistill.estimators.schedules import (
    DistillWeightSchedule,
    KappaSchedule,
    TemperatureSchedule,
)
from certdistill.estimators.teacher_outputs import TEACHER_BOUNDS
from certdistill.estimators.transfer import TRANSFER_KINDS

__all__ = ["DISTILLATION_LOSSES", "DistilledStudent"]


def _n_parameters(module) -> int:
    return sum(p.numel() for p in module.parameters())


class DistilledStudent(TeacherGuidance, CertifiedNetBase):
    """Certifiably robust student trained by IBP and distillation from a certified teacher.

    The student is trained as :class:`~certdistill.CertifiedTeacher` with ``method="ibp"`` (same
    eps warm-up and ramp, kappa schedule, Shi et al. regularisers, learning-rate decay), with
    guidance from the teacher. The teacher's outputs are computed in eval mode without gradients
    and cached per training sample while the radius does not change
    (:class:`~certdistill.estimators.teacher_outputs.TeacherOutputs`): its clean logits ``t(x)``
    and its
    worst-case logits ``that(x, eps)`` at the student's current training radius (while eps ramps,
    rounded up to one of ``teacher_radius_levels`` steps: a ball that contains the student's),
    minus its margin lower bounds (``that_j = -m_j``, ``that_y = 0``, bound method
    ``teacher_bounds``) or, for an adversarially trained teacher, its logits at a PGD point.
    With the student's clean logits
    ``s`` and worst-case logits ``shat`` (one interval pass), the certified term is
    ``L_cert = kappa CE(s, y) + (1 - kappa) CE(shat, y)`` and ``loss`` selects:

    * ``"baseline"``: ``(1 - lam) L_cert + lam T^2 [KL(softmax(t/T) || softmax(s/T))
      + mu KL(softmax(that/T) || softmax(shat/T))]``;
    * ``"soft-certified"``: ``L_cert`` with the soft target ``(1 - lam) onehot(y) +
      lam softmax(t/T)`` in place of the label;
    * ``"margin"``: ``(1 - lam) L_cert + lam [H(s - s_y, t - t_y) + mu H(shat, that)]``, margin
      matching with the Huber distance ``H`` at scale ``T``
      (:func:`~certdistill.estimators.losses.margin_matching`);
    * ``"adversarial"``: ``(1 - lam) L_cert + lam T^2 KL(softmax(t(x')/T) || softmax(s(x')/T))``
      at the student's own PGD point ``x'`` (``pgd_steps`` steps): logit-level adversarial
      distillation in place of the adversarial term of expressive losses;
    * ``"selective"`` (default): ``L_cert`` in which a sample's certified term is weighted by
      ``w = 1 - lam * sigmoid(g / T)`` and its clean term by ``1 - w``, where ``g`` is the
      teacher's largest worst-case logit other than the label's (minus its smallest margin
      bound at the current radius): the small student does not spend capacity on points that
      even the teacher cannot make robust. ``T`` softens the selection (``T -> 0``: the hard
      choice between samples the teacher certifies and those it does not),

    where ``lam = distill_weight``, ``mu = worst_case_weight`` and ``T = temperature``; ``lam`` and
    ``T`` can move linearly to ``distill_weight_end`` and ``temperature_end`` over the eps ramp.
    With ``lam = 0`` every loss is plain IBP training. ``benchmarks/bench_distill.py`` compares
    them with students trained alone (see docs/benchmarks.md for the measured tables).

    Parameters
    ----------
    teacher : CertifiedNetBase or sklearn.frozen.FrozenEstimator
        The teacher. A fitted certdistill estimator (e.g. :class:`~certdistill.CertifiedTeacher`)
        is used as it is; a ``FrozenEstimator`` wrapping a fitted one is used as it is and
        survives :func:`~sklearn.base.clone` (the way to share one teacher across a grid search);
        an unfitted one is cloned and fitted on the student's data in ``fit``. The teacher's
        classes and number of features must match the student's data.
    module : torch.nn.Module, class or None, default=None
        The student network (see :class:`~certdistill.estimators.base.CertifiedNetBase`).
    temperature : float, default=4.0
        Distillation temperature ``T`` (> 0): the softness of the teacher's targets, or of the
        selection of the ``"selective"`` loss.
    distill_weight : float, default=1.0
        Weight ``lam`` of the teacher's guidance (see above), in [0, 1]. The benchmark's settings
        of the other losses: ``"baseline"`` 0.5, ``"soft-certified"`` 0.3, ``"margin"`` 0.2,
        ``"adversarial"`` 0.5.
    worst_case_weight : float, default=1.0
        Weight ``mu`` of the worst-case term of ``"baseline"`` and ``"margin"`` (>= 0).
    loss : {"baseline", "soft-certified", "margin", "adversarial", "selective"}, \
default="selective"
        Distillation loss. ``"selective"`` with the default transfer set is the default: it
        measured best in ``benchmarks/bench_distill_fair.py`` (figures: docs/benchmarks.md).
    teacher_bounds : {"ibp", "crown-ibp", "best", "crown", "pgd"}, default="ibp"
        How the teacher's worst-case logits are computed: a bound method (``"best"``: the tighter
        of IBP and CROWN-IBP per margin; ``"crown"`` is tighter but slow on CNNs), or ``"pgd"``
        for an adversarially trained teacher (e.g. ``CertifiedTeacher(method="mtl-ibp",
        alpha=0.0)``), whose bounds are vacuous.
    distill_weight_end, temperature_end : float or None, default=None
        Values of ``lam`` and ``T`` at the end of the eps ramp (``None``: constant).
    pgd_steps : int, default=1
        Attack steps of the ``"adversarial"`` loss.
    cache_teacher : bool, default=True
        Keep the teacher's outputs per training sample (clean logits for the whole fit,
        worst-case logits while the radius does not change); the cache is dropped after ``fit``.
    teacher_radius_levels : int or None, default=8
        While eps ramps, the teacher's worst-case logits are computed at the student's radius
        rounded up to one of this many equal steps of the final training radius (the rounded-up
        ball contains the student's, so the targets stay worst cases over the student's ball),
        and each step is computed once per training row (with ``cache_teacher``). ``None``: at
        the student's exact radius, for every batch of the ramp (slower, see docs/benchmarks.md).
    transfer : str or tuple of str, default=("noise", "ball")
        Teacher-labelled inputs added to the training data (a transfer set), some of
        ``"noise"``, ``"ball"``, ``"shift"``, ``"mixup"`` (:mod:`certdistill.estimators.transfer`);
        each
        kind adds ``transfer_size`` times as many inputs as there are training rows, labelled by
        the teacher's prediction. ``()`` trains on the given rows only.
    transfer_size : float, default=4.0
        Inputs per transfer kind, as a multiple of the training rows (4: eight teacher-labelled
        inputs per training row with the default kinds; larger sets certified more on digits
        and breast cancer and cost proportionally more fit time, see docs/benchmarks.md).
    transfer_keep : {"auto", "certified", "all"}, default="auto"
        Which transfer inputs train the student. ``"certified"``: those whose teacher label the
        teacher proves within the eps ball (by ``teacher_bounds``; for ``"pgd"``, those its
        attack does not flip); ``"all"``: every one; ``"auto"``: every one when the teacher
        certifies at least half of them (``AUTO_SHARE`` of
        :mod:`certdistill.estimators.guidance`), else the certified ones. Measured
        (docs/benchmarks.md, "Real images"): on the 8x8 digits at eps 0.1 the teacher certifies
        about 90 % of them and keeping all certified 81.1 % against 79.3 % for the certified
        ones (3 seeds); on MNIST at eps 0.3 it certifies none, and keeping all made the
        student certify nothing. ``transfer_kept_`` is the number kept, ``transfer_certified_``
        the share the teacher certifies (``None`` with ``"all"``).
    student_size : float, default=0.1
        Without ``module`` (and without ``module__hidden_sizes`` / ``module__channels``), the
        student is the default network for its input with every width scaled so that it has
        about this fraction of the teacher's parameters.
    unlabeled_label : int, str or None, default=None
        The label that marks unlabelled rows of ``y`` (``-1`` is scikit-learn's semi-supervised
        convention). Such rows are labelled by the teacher (which, when it is fitted here, sees
        the labelled rows only). ``None``: every row is labelled, and ``-1`` is a class like any
        other (binary problems often label -1 and 1, so the convention is opt-in).
    **kwargs
        The parameters every certified estimator shares, with their defaults, documented in
        :class:`~certdistill.estimators.base.CertifiedNetBase` (``eps``, ``eps_train_ratio``,
        ``warmup``,
        ``ramp``, ``kappa_start``/``kappa_end`` of ``L_cert``, ``reg_lambda``, ``reg_tol``,
        ``input_shape``, ``lower``, ``upper``, ``random_state``, the learning-rate schedule,
        ``max_epochs``, ``torch_threads`` (the teacher's forward passes during the student's
        ``fit`` use the student's setting), and skorch's parameters; ``criterion`` must stay
        ``torch.nn.CrossEntropyLoss``, as ``fit`` checks). ``input_shape``, ``lower``
        and ``upper`` concern the student; the teacher reshapes flat rows with its own
        ``input_shape``.

    Attributes
    ----------
    teacher_ : CertifiedNetBase
        The fitted teacher used in training.
    classes_ : ndarray
        Class labels.
    n_features_in_ : int
        Number of features seen in ``fit``.
    module_ : torch.nn.Module
        The trained student network.
    history_ : skorch.History
        Losses and schedule values per epoch (and per batch).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.frozen import FrozenEstimator
    >>> from certdistill import CertifiedTeacher, DistilledStudent
    >>> X, y = load_digits(return_X_y=True)
    >>> X, y = X[:300] / 16, y[:300]
    >>> teacher = CertifiedTeacher(method="ibp", lower=0.0, upper=1.0, max_epochs=2,
    ...                            module__hidden_sizes=(64,), random_state=0).fit(X, y)
    >>> student = DistilledStudent(FrozenEstimator(teacher), lower=0.0, upper=1.0,
    ...                            module__hidden_sizes=(32,), max_epochs=2,
    ...                            random_state=0).fit(X, y)
    >>> student.certify(X[:5], method="ibp").certified.shape
    (5,)
    """

    _parameter_ranges = {
        "loss": Choice(DISTILLATION_LOSSES),
        "teacher_bounds": Choice(TEACHER_BOUNDS),
        "temperature": POSITIVE,
        "temperature_end": Range(0.0, low_open=True, optional=True),
        "distill_weight": UNIT,
        "distill_weight_end": Range(0.0, 1.0, optional=True),
        "worst_case_weight": NON_NEGATIVE,
        "pgd_steps": Range(1, integer=True),
        "transfer": Subset(TRANSFER_KINDS),
        "transfer_size": NON_NEGATIVE,
        "transfer_keep": Choice(("auto", "certified", "all")),
        "student_size": Range(0.0, 1.0, low_open=True),
        "teacher_radius_levels": Range(1, integer=True, optional=True),
    }

    def __init__(
        self,
        teacher,
        module=None,
        *,
        temperature: float = 4.0,
        distill_weight: float = 1.0,
        worst_case_weight: float = 1.0,
        loss: str = "selective",
        teacher_bounds: str = "ibp",
        distill_weight_end: float | None = None,
        temperature_end: float | None = None,
        pgd_steps: int = 1,
        cache_teacher: bool = True,
        teacher_radius_levels: int | None = 8,
        transfer: str | tuple[str, ...] = ("noise", "ball"),
        transfer_size: float = 4.0,
        transfer_keep: str = "auto",
        student_size: float = 0.1,
        unlabeled_label=None,
        **kwargs,
    ):
        super().__init__(module, **kwargs)
        self.teacher = teacher
        self.temperature = temperature
        self.distill_weight = distill_weight
        self.worst_case_weight = worst_case_weight
        self.loss = loss
        self.teacher_bounds = teacher_bounds
        self.distill_weight_end = distill_weight_end
        self.temperature_end = temperature_end
        self.pgd_steps = pgd_steps
        self.cache_teacher = cache_teacher
        self.teacher_radius_levels = teacher_radius_levels
        self.transfer = transfer
        self.transfer_size = transfer_size
        self.transfer_keep = transfer_keep
        self.student_size = student_size
        self.unlabeled_label = unlabeled_label

    # ------------------------------------------------------------ parameters
    #: The certified losses compute their cross-entropies directly (``criterion`` is refused).
    _uses_criterion = False

    def _schedule_callbacks(self) -> list:
        return [
            ("kappa_schedule", KappaSchedule()),
            ("distill_weight_schedule", DistillWeightSchedule()),
            ("temperature_schedule", TemperatureSchedule()),
        ]

    def on_train_begin(self, net, X=None, y=None, **kwargs):
        """Final schedule values (used when a schedule callback is removed); a fresh cache of
        teacher outputs, bound to the training rows (their outputs are computed for all rows
        at once and looked up by row index)."""
        self.current_kappa_ = float(self.kappa_end)
        self.current_distill_weight_ = float(
            self.distill_weight if self.distill_weight_end is None else self.distill_weight_end
        )
        self.current_temperature_ = float(
            self.temperature if self.temperature_end is None else self.temperature_end
        )
        self.teacher_outputs_ = None
        self._train_batches = self._batch_rows = None
        super().on_train_begin(net, X=X, y=y, **kwargs)
        if self.cache_teacher and isinstance(X, (np.ndarray, Tensor)) and y is not None:
            self._teacher_outputs().bind(X, y)

    def on_train_end(self, net, X=None, y=None, **kwargs):
        """Drop the cached teacher outputs and the batch iterator (they would bloat a pickled
        student)."""
        self.teacher_outputs_ = None
        self._train_batches = self._batch_rows = None
        super().on_train_end(net, X=X, y=y, **kwargs)

    # --------------------------------------------------------------- module
    def build_default_module(self, n_features: int, n_classes: int, **kwargs):
        """The default student: the default network for its input, scaled to the teacher.

        Without ``module__hidden_sizes`` (and, for images, ``module__channels``) every width of
        the default network (:meth:`CertifiedNetBase.build_default_module`: an MLP for flat
        features, a CNN with ``input_shape``) is multiplied by one factor, chosen so that the
        student has about ``student_size`` times the teacher's parameters (at least 4 units per
        layer).

        Returns
        -------
        torch.nn.Module
        """
        image = self.input_shape is not None and len(tuple(self.input_shape)) == 3
        given = {"hidden_sizes", "channels"} if image else {"hidden_sizes"}
        if given & set(kwargs) or not hasattr(self, "teacher_"):
            return super().build_default_module(n_features, n_classes, **kwargs)
        target = float(self.student_size) * _n_parameters(self.teacher_.module_)
        widths = (
            {"hidden_sizes": (512, 512)}
            if not image
            else {"channels": (32, 64), "hidden_sizes": (256,)}
        )

        def scaled(factor: float) -> dict:
            return {
                name: tuple(max(4, round(w * factor)) for w in values)
                for name, values in widths.items()
            }

        low, high = 0.0, 1.0
        for _ in range(30):  # the parameter count grows with the factor: bisection
            middle = (low + high) / 2
            built = super().build_default_module(n_features, n_classes, **scaled(middle), **kwargs)
            low, high = (middle, high) if _n_parameters(built) < target else (low, middle)
        return super().build_default_module(n_features, n_classes, **scaled(high), **kwargs)

    # ----------------------------------------------------------------- loss
    def training_loss(self, x: Tensor, y: Tensor, training: bool = True) -> tuple[Tensor, Tensor]:
        """Distillation loss of one batch (see the class docstring).

        Parameters
        ----------
        x : Tensor
            Module inputs of the batch.
        y : LongTensor
            Encoded labels.
        training : bool, default=True
            Training (train mode, gradients) or validation step.

        Returns
        -------
        loss : Tensor
            Scalar loss.
        logits : Tensor
            Clean student logits.
        """
        lam = float(getattr(self, "current_distill_weight_", self.distill_weight))
        terms = self.interval_terms(x, y, training)
        entry = DISTILLATION_LOSSES[self.loss]
        outputs = self._teacher_outputs()
        rows = getattr(self, "_batch_rows", None) if training else None
        t, that = outputs(
            x,
            y,
            outputs.rounded_up(terms.perturbation),
            worst_case=entry.needs_worst and lam > 0,
            rows=rows,
        )
        batch = DistillationBatch(
            x,
            y,
            terms,
            t,
            that,
            weight=lam,
            temperature=float(getattr(self, "current_temperature_", self.temperature)),
            kappa=float(getattr(self, "current_kappa_", self.kappa_end)),
            worst_case_weight=float(self.worst_case_weight),
            module=self.module_,
            pgd_steps=int(self.pgd_steps),
            teacher_at=lambda inputs: outputs(
                inputs, y, terms.perturbation.scaled(0.0), worst_case=False, cache=False
            )[0],
        )
        return entry.function(batch) + terms.regularizer, terms.logits

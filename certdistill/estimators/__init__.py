"""The scikit-learn estimators and what they are made of.

:class:`~certdistill.CertifiedTeacher` and :class:`~certdistill.DistilledStudent` build on
:mod:`~certdistill.estimators.base` (skorch, parameters, the certified training step, the
certification API). Beside them: the default networks (``models``), training losses and
distillation losses (``losses``), the schedules of the radius and the loss weight
(``schedules``), the teacher's cached outputs (``teacher_outputs``), transfer sets
(``transfer``), scorers (``scoring``) and the safe file format (``persistence`` with
``_safe_config`` and ``_architecture``).

May import: ``bounds``, ``verify``, ``certification``, ``scale``, ``io``, ``exceptions``.
Imported by: the package root, ``cli``.
"""

"""Lightning training: ``DistillationModule`` and the parts it composes, ``CausalLMModule``.

- :mod:`~lightning_kd.training.distillation`: the module (steps, hooks, override points).
- :mod:`~lightning_kd.training.teachers`: the kinds of teacher (live, fused head, cache) behind
  one interface, :class:`~lightning_kd.training.teachers.TeacherBackend`.
- :mod:`~lightning_kd.training.sequences`: where each step's token sequences come from.
- :mod:`~lightning_kd.training.teacher`: build, load and freeze a teacher model.
- :mod:`~lightning_kd.training.vocabulary`: padded-vocabulary reconciliation.
- :mod:`~lightning_kd.training.token_window`: exact per-token normalisation of gradients.
- :mod:`~lightning_kd.training.checkpoint_policy`: teacher-free checkpoints, recorded settings.
- :mod:`~lightning_kd.training.eval_metrics`: validation/test token sums.
- :mod:`~lightning_kd.training.optim`: optimizers built after parallelisation.
"""

from lightning_kd.training.distillation import DistillationModule
from lightning_kd.training.lm_module import CausalLMModule
from lightning_kd.training.loss_terms import LossTerms, logits_of
from lightning_kd.training.teacher import TeacherSource

__all__ = ["CausalLMModule", "DistillationModule", "LossTerms", "TeacherSource", "logits_of"]

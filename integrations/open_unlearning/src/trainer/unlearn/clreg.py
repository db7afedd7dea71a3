"""CLReg (contrastive representation regularization) on OpenUnlearning's methods.

Each class adds ``clreg_weight * CLReg(forget features, retain features)`` to the loss of the
method it extends, reading the features from the forwards the method already makes
(``clreg_fast.integrations.hf.CLRegMixin``; no extra forward pass). The CLReg arguments arrive
through ``trainer.method_args`` like the method's own; see ``configs/trainer/CLReg*.yaml``.
"""
from clreg_fast.integrations.hf import CLRegMixin

from trainer.unlearn.grad_diff import GradDiff
from trainer.unlearn.npo import NPO
from trainer.unlearn.simnpo import SimNPO


class _OpenUnlearningCLReg(CLRegMixin):
    """Concept ids from the forget rows' dataset index when the batch has no concept ids.

    With ``clreg_rows_per_concept: N`` the forget row at dataset index ``i`` belongs to concept
    ``i // N`` (TOFU lists 20 questions per fictitious author, consecutively); this needs the
    collator that keeps the index (``collator=DataCollatorForSupervisedDatasetwithIndex``).
    ``null``: every forget row of a micro-batch is one concept.
    """

    def __init__(self, *args, clreg_rows_per_concept=None, **kwargs):
        if clreg_rows_per_concept is not None and (
                isinstance(clreg_rows_per_concept, bool)
                or not isinstance(clreg_rows_per_concept, int) or clreg_rows_per_concept < 1):
            raise ValueError("clreg_rows_per_concept must be null or an int >= 1, got "
                             f"{clreg_rows_per_concept!r}")
        self.clreg_rows_per_concept = clreg_rows_per_concept
        super().__init__(*args, **kwargs)

    def clreg_concept_ids(self, forget):
        concept_ids = super().clreg_concept_ids(forget)
        if concept_ids is None and self.clreg_rows_per_concept is not None:
            if "index" not in forget:
                raise KeyError("clreg_rows_per_concept needs the forget batch's 'index': use "
                               "collator=DataCollatorForSupervisedDatasetwithIndex")
            concept_ids = forget["index"] // self.clreg_rows_per_concept
        return concept_ids


class CLRegGradDiff(_OpenUnlearningCLReg, GradDiff):
    pass


class CLRegNPO(_OpenUnlearningCLReg, NPO):
    pass


class CLRegSimNPO(_OpenUnlearningCLReg, SimNPO):
    pass

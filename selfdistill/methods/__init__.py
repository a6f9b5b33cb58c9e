"""One module or package per self-distillation method: its privileged-information source and whatever else only it
needs (SD-Zero's self-revision stage, AVSD's view combination, Skill-SD's skill bank). The core (config, trainer,
rollout, sequences, teacher, losses, fused) names none of them; a method plugs in through the
:class:`selfdistill.sources.PrivilegedSource` interface (docs/methods/new-method.md).

- ``opsd``: a reference solution (``ReferenceSolution``)
- ``sdzero``: the model as its own reviser (``source.Reviser``) and self-revision training (``srt``)
- ``avsd``: several views (``source.MultiView``) combined by consensus plus a gated residual (``combine``)
- ``skillsd``: skills the model summarises from its trajectories (``source.Skills``) in a bank (``bank``)
- ``sdpo``: a successful sibling rollout (``SiblingSolution``), the one-file worked example
"""

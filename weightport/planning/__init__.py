"""Planning: decide every target tensor's fate from names and shapes, reading no tensor data.

The data flows one way::

    source keys --route--> candidates per target name --decide--> recipes / fresh reasons
                                                                    --> TransferPlan + preview report

* :mod:`~weightport.planning.data`: the plan as data (``Target``, ``Input``, ``Recipe``,
  ``TransferPlan``) and the one recipe evaluator, used for shapes here and values when applying.
* :mod:`~weightport.planning.targets`: the target module's tensors, tied names grouped.
* :mod:`~weightport.planning.route`: where each source key goes, by the mapping (names only).
* :mod:`~weightport.planning.decide`: one loop over the targets: recipe or fresh reason.
* :mod:`~weightport.planning.build`: the orchestration, strictness checks and report.

Applying (:mod:`weightport.apply`) consumes a plan; it never plans. The package imports none of
its modules, so importing :mod:`~weightport.planning.data` (as applying does) pulls in nothing else.
"""

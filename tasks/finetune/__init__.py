"""Fine-tuning tasks: VQA and GQA (soft-score question answering, :mod:`.qa`), NLVR2 (:mod:`.nlvr2`), and the
evaluation of a fine-tuned model on a split (:mod:`.evaluate`, ``lxmert-train TASK --eval-only``)."""

"""LXMERT pretraining (``lxmert-train pretrain``): the corpus (:mod:`.corpus`), the masked items (:mod:`.data`) and
the task (:mod:`.task`)."""

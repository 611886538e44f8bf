"""The benchmark runner on the planted-memorization testbed (:mod:`mnemoguard.testbed` holds the data).

``mnemoguard bench RECIPE --out RUN`` (:func:`.run.run_bench`) builds a testbed, trains on it with the reference
trainer and, at every evaluated checkpoint (:mod:`.checkpoint`), measures the ground truth (:mod:`.probes`: copies of
the planted images among generations, template verbatim rates, fidelity) and every signal (:mod:`.signals`), with
the analyses at the end (:mod:`.final`) and the report (:mod:`.report`). Settings: :mod:`.config` (``BenchConfig``),
:mod:`.recipe` (the trainer's recipe), :mod:`.mitigation` (the arms), :mod:`.caption_probes` (which captions are
probed). Several runs are summarised by :mod:`.summary`, :mod:`.mitigation_summary` and :mod:`.danger_zone_summary`,
whose commands are ``scripts/summarize_*.py``. See ``docs/testbed.md``.
"""

"""The evaluation workflow: calibration runs, Fisher sensitivities, the evaluator, sweeps, recipe
families, the resumable run and the report (``sdjax eval``). Uses the pipeline, the samplers and
``quant``; nothing below imports it."""

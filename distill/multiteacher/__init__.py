"""Several teachers at once on the lean KD step, with fixed, routed, confidence-, gate- or
meta-learned per-token weights (docs/multiteacher.md). ``import distill.multiteacher`` stays light:
the trainer plug-ins live in :mod:`distill.multiteacher.stage`."""

"""Training: the loop (:mod:`.loop`), the builder that hands it its parts (:mod:`.build`), checkpoints
(:mod:`.checkpoint`), callbacks (:mod:`.callbacks`), the data order (:mod:`.batches`) and what a run
leaves (:mod:`.outputs`). docs/architecture.md draws the picture."""

"""Data for training: batches from memory today; prompt sources and on-disk caches next."""

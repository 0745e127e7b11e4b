"""`emotion2vec-serve batch`: score whole archives with a Ray Data job (see job.py)."""

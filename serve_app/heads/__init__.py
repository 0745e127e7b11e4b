"""Custom heads: users' own labels over the frozen emotion2vec utterance embedding (the head
file, its registry, training and evaluation)."""

"""Audio in: bytes of any supported file -> 16 kHz mono float32, every limit checked on the way
(libsndfile first, FFmpeg through PyAV in worker processes for the rest)."""

"""Whole recordings, scored utterance by utterance (POST /v1/segments): the segments a caller
gives (JSON or RTTM) and their checks, long speech cut at its quietest point, and the answer's
per-speaker summary. Plain Python and numpy: no torch, no Ray, no HTTP."""

"""python -m serve_app.checkpoints: write a random-weight model directory (see generate.py)."""

from serve_app.checkpoints.generate import main

main()

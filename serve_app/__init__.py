"""emotion2vec-serve: FunASR's emotion2vec+ models served on Ray Serve (serve_app.app:build_app)."""

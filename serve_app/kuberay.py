"""`python -m serve_app.kuberay`: the manifest generator (serve_app/tools/kuberay.py)."""

from serve_app.tools.kuberay import main

if __name__ == "__main__":
    main()

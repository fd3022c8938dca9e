"""``python -m bench.serving``: :func:`bench.serving.cli.main`."""

from bench.serving.cli import main

if __name__ == "__main__":
    main()

"""``python3 -m keyhole_client --help``."""

from ._cli import run

if __name__ == "__main__":
    run()

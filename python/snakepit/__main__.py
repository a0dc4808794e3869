"""Entry point for ``python -m snakepit``: run one worker process."""

import sys

from snakepit.worker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""PID 1 of the trainer image: supervise `python -m cloudtune.trainer` (or the given command).

The logic lives in cloudtune/trainer/entrypoint.py, where it is tested; this file only calls it so
the image's entrypoint does not depend on how cloudtune was installed.
"""

import sys

from cloudtune.trainer.entrypoint import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""`python -m cloudtune.trainer --spec job.yaml`: see cloudtune/trainer/cli.py."""

from cloudtune.trainer.cli import main
from cloudtune.trainer.launch import exit_process

exit_process(main())  # skips the interpreter's final collections of a torch-sized heap (launch.py)

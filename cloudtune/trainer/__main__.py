"""`python -m cloudtune.trainer --spec job.yaml`: see cloudtune/trainer/cli.py."""

from cloudtune.trainer.cli import main

raise SystemExit(main())

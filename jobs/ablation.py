#!/usr/bin/env python
"""Ablation of the paper's method against this project's default (``--help`` for the options).

``python jobs/ablation.py`` runs the paper recipe and the default on a reduced synthetic config, two seeds each,
then every departure set back to the paper's value alone, one run at a time, and writes docs/ablation.md.
Re-running it continues where it stopped.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from olr_ray.cli import ablation_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(ablation_main(prog="ablation.py"))

#!/usr/bin/env python
"""Run the whole OLR pipeline (``--help`` for the options); the same as the ``olr-ray`` command.

Locally: ``python jobs/full_pipeline.py --preset demo``. On a cluster:
``ray job submit --working-dir . -- python jobs/full_pipeline.py --preset paper --data s3://... --output s3://...``
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from olr_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="full_pipeline.py"))

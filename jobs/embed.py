#!/usr/bin/env python
"""Embed new images with a trained run, without training (--help for the options).

python jobs/embed.py --model runs/<run-id> --data /path/to/images --output runs/new-embeddings
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from olr_ray.cli import embed_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(embed_main(prog="embed.py"))

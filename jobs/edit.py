#!/usr/bin/env python
"""Add or remove labels of a trained run's images and draw the grid (--help for the options).

python jobs/edit.py --run runs/<run-id> --image 000001.jpg --add Eyeglasses --remove Smiling --scale 1.5 --out grid.png
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from olr_ray.cli import edit_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(edit_main(prog="edit.py"))

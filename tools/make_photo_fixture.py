#!/usr/bin/env python3
"""Writes tests/fixtures/photo_cat.png: a real photograph for the editing tests (issue 7).

scikit-image's `chelsea` sample image (a cat; the scikit-image sample images are CC0 / public
domain), centre-cropped to a square and resized to 32x32 RGB with PIL's Lanczos filter.

Run:  python3 -m venv .venv && .venv/bin/pip install scikit-image pillow
      .venv/bin/python tools/make_photo_fixture.py
"""
import os

import numpy as np
from PIL import Image
from skimage import data

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "photo_cat.png")

img = data.chelsea()  # (300, 451, 3) uint8
h, w = img.shape[:2]
s = min(h, w)
top, left = (h - s) // 2, (w - s) // 2
square = Image.fromarray(np.ascontiguousarray(img[top:top + s, left:left + s]))
square.resize((32, 32), Image.LANCZOS).save(OUT)
print("wrote", os.path.abspath(OUT))

"""Contact sheet layout (the stills themselves are checked against the video in test_composer)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from storyreel_composer.stills import SHEET_GAP, contact_sheet, thumbnail


def test_contact_sheet_lays_thumbnails_out_in_rows_in_order_on_black():
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200)]
    thumbs = [thumbnail(Image.new("RGB", (128, 72), c), 48) for c in colours]
    assert thumbs[0].size == (48, 28)  # even sides
    sheet = np.asarray(contact_sheet(thumbs, 2))
    assert sheet.shape == (SHEET_GAP + 2 * (28 + SHEET_GAP), SHEET_GAP + 2 * (48 + SHEET_GAP), 3)
    cells = [sheet[4:32, 4:52], sheet[4:32, 56:104], sheet[36:64, 4:52]]
    for cell, colour in zip(cells, colours, strict=True):
        assert (cell == colour).all()
    assert not sheet[36:64, 56:104].any()  # the unused cell stays black
    assert not sheet[:4].any() and not sheet[:, :4].any()

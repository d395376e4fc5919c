"""A contact sheet of SkyEye-Synth scenes, for people to judge the stand-in at a glance."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .render import render
from .scene import LAND_USES, sample_scene


def contact_sheet(out: Path, n: int = 16, tile: int = 224, seed: int = 0, boxes: bool = False) -> Path:
    """Render `n` scenes (every land use, one in the RSVQA-HR test-2 city style) into a grid PNG."""
    uses = list(LAND_USES)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    label_h = 18
    sheet = Image.new("RGB", (cols * (tile + 4) + 4, rows * (tile + label_h + 4) + 4), (250, 250, 250))
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        style = "phili" if i == n - 1 else "default"
        scene = sample_scene(np.random.default_rng([seed, i]), land_use=uses[i % len(uses)], style=style)
        img = render(scene, tile)
        if boxes:
            d = ImageDraw.Draw(img)
            for o in scene.objects:
                d.rectangle([v * tile for v in o.box], outline=(255, 0, 255))
        x, y = 4 + (i % cols) * (tile + 4), 4 + (i // cols) * (tile + label_h + 4)
        sheet.paste(img, (x, y))
        label = scene.land_use + (" (test-2 city style)" if style == "phili" else "")
        count = len(scene.objects)
        draw.text((x + 2, y + tile + 3), f"{label}: {count} object{'' if count == 1 else 's'}", fill=(20, 20, 20))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out, optimize=True)
    return out

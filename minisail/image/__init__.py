"""Images in: opening files safely and the per-family preprocessing (preprocess), and the tiles picture (render).

The grid decision itself lives in `minisail.tiling`, shared by everything that counts image tokens.
"""

from minisail.image.preprocess import (
    Tiles,
    internvl_pixel_values,
    internvl_tiles,
    open_image,
    yivl_pixel_values,
    yivl_tile,
)

__all__ = ["Tiles", "internvl_pixel_values", "internvl_tiles", "open_image", "yivl_pixel_values", "yivl_tile"]

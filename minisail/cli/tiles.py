"""`python -m minisail tiles`: how an image is cut into tiles, and how many image tokens each family spends."""

from __future__ import annotations

import argparse

from minisail.errors import MinisailError


def _add_tiles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (any format and mode Pillow reads)")
    parser.add_argument("--min-tiles", type=int, default=1, metavar="N", help="fewest grid tiles (default 1)")
    parser.add_argument("--max-tiles", type=int, default=12, metavar="N", help="most grid tiles (default 12)")
    parser.add_argument("--image-size", type=int, default=448, metavar="PX", help="tile side (default 448)")
    parser.add_argument("--out", metavar="PNG", help="write a labelled picture of the tiles and thumbnail")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _run_tiles(args) -> int:
    import json

    from minisail.errors import ImageError
    from minisail.image.preprocess import internvl_tiles
    from minisail.image.render import render_tiles, summarize

    if 1 <= args.max_tiles < args.min_tiles:  # upstream silently falls back to one tile; on a command line it is a typo
        raise ImageError(
            f"--min-tiles {args.min_tiles} is larger than --max-tiles {args.max_tiles}: no grid fits; give min <= max "
            "(minisail.tiling.best_grid reproduces upstream's 1x1 fallback where that is wanted)"
        )
    tiles = internvl_tiles(args.image, min_tiles=args.min_tiles, max_tiles=args.max_tiles, image_size=args.image_size)
    summary = {"image": args.image, "min_tiles": args.min_tiles, "max_tiles": args.max_tiles, **summarize(tiles)}
    if args.out:
        try:
            render_tiles(tiles).save(args.out, format="PNG")
        except OSError as error:
            raise MinisailError(f"cannot write {args.out}: {error}") from None
    summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
        return 0
    thumb = " + thumbnail" if summary["thumbnail"] else ""
    print(f"image: {args.image} ({summary['width']}x{summary['height']})")
    print(
        f"grid: {summary['cols']} cols x {summary['rows']} rows of {summary['image_size']}px{thumb} "
        f"= {summary['num_tiles']} tiles (tiles {args.min_tiles}..{args.max_tiles})"
    )
    print(f"image tokens ({summary['tokens_per_tile']} per tile):")
    for family, count in summary["image_tokens"].items():
        note = "one 448px image, no tiling" if family == "Yi-VL" else f"{summary['num_tiles']} tiles"
        print(f"  {family:<20} {count:>6}  ({note})")
    if args.out:
        print(f"picture: {args.out}")
    return 0


COMMAND = (
    "show how an image is tiled and how many image tokens it costs",
    _add_tiles,
    _run_tiles,
)

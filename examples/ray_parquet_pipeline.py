"""Restore the faces in a parquet dataset with Ray Data: your read, the restoration stage, your write.

    python examples/ray_parquet_pipeline.py s3://bucket/photos/ s3://bucket/restored/ --ddpm models/ddpm \\
        --enhancer models/sparnethd --preset auto
    python examples/ray_parquet_pipeline.py in/ out/ --restorer tiny          # no weights: tiny RANDOM models

The input has an image column (``--image-column``, default ``image``) of encoded bytes, or Hugging Face's image
struct ``{bytes, path}``. The output has every input column unchanged, ``restored_image`` (what ``dr2 restore`` writes
for the image, in the column's own type), ``dr2`` (the sample's ``dr2.json``) and ``dr2_status``, one row per input
row. ``-o FIELD=VALUE`` sets any other ``dr2 restore`` option (``-o restore_actors=4 -o gpus_per_restorer=1``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import ray
import ray.data

from pipeline import restore_dataset


def option(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE``, the value read as JSON when it is JSON (numbers, true/false, null), else as a string."""
    name, _, value = text.partition("=")
    try:
        return name.replace("-", "_"), json.loads(value)
    except ValueError:
        return name.replace("-", "_"), value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="parquet file(s) or folder, local or s3://")
    p.add_argument("dst", help="output folder, local or s3://")
    p.add_argument("--image-column", default="image")
    p.add_argument("--preset", default="moderate", help="mild, moderate, severe or auto (as dr2 restore --preset)")
    p.add_argument("--restorer", default="dr2", help="dr2 (needs --ddpm/--enhancer), tiny, passthrough")
    p.add_argument("--ddpm", default="")
    p.add_argument("--enhancer", default="")
    p.add_argument("-o", "--option", type=option, action="append", default=[], metavar="FIELD=VALUE")
    args = p.parse_args()

    ray.init()  # or ray.init(address="auto") on a cluster; restore_dataset sizes its pools from what it finds
    ds = ray.data.read_parquet(args.src)
    ds = restore_dataset(ds, image_column=args.image_column, preset=args.preset, restorer=args.restorer,
                         ddpm=args.ddpm, enhancer=args.enhancer, **dict(args.option))
    ds.write_parquet(args.dst)

    # what happened, read back from the output: rows per status
    counts = ray.data.read_parquet(args.dst).groupby("dr2_status").count().take_all()
    print(", ".join(f"{c['dr2_status']}: {c['count()']}" for c in sorted(counts, key=lambda c: c["dr2_status"])))


if __name__ == "__main__":
    main()

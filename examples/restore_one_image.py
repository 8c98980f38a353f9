"""Restore the faces of one photo from Python, and see what happened to each face.

    python examples/restore_one_image.py photo.jpg restored.jpg --ddpm models/ddpm --enhancer models/sparnethd
    python examples/restore_one_image.py photo.jpg restored.jpg --restorer tiny    # no weights: tiny RANDOM models

Writes the restored photo (same format as the input; the input's bytes if no face was restored) and, beside it,
``<output>.dr2.json``: the sample's metadata, as ``dr2 restore`` writes it. Prints one line per face.
``-o FIELD=VALUE`` sets any other option of ``dr2 restore`` (``-o tau=30``, ``-o device=cuda``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline import Restorer


def option(text: str) -> tuple[str, Any]:
    """``FIELD=VALUE``, the value read as JSON when it is JSON (numbers, true/false, null), else as a string."""
    name, _, value = text.partition("=")
    try:
        return name.replace("-", "_"), json.loads(value)
    except ValueError:
        return name.replace("-", "_"), value


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", type=Path)
    p.add_argument("output", type=Path)
    p.add_argument("--preset", default="moderate", help="mild, moderate, severe or auto (as dr2 restore --preset)")
    p.add_argument("--restorer", default="dr2", help="dr2 (needs --ddpm/--enhancer), tiny, passthrough")
    p.add_argument("--ddpm", default="")
    p.add_argument("--enhancer", default="")
    p.add_argument("-o", "--option", type=option, action="append", default=[], metavar="FIELD=VALUE")
    args = p.parse_args()

    # Build once (the models load here), then call it on as many images as you like.
    restorer = Restorer(preset=args.preset, restorer=args.restorer, ddpm=args.ddpm, enhancer=args.enhancer,
                        **dict(args.option))
    result = restorer(args.image.read_bytes())  # encoded bytes; a numpy array needs channels="rgb" or "bgr"

    print(f"{args.image}: {result.status.value}" + (f" ({result.error})" if result.error else ""))
    for i, face in enumerate(result.faces):
        box = ", ".join(f"{v:.0f}" for v in face.box)
        verdict = face.degradation.verdict.value if face.degradation else "?"
        psnr = f"{face.quality.lowfreq_psnr:.1f} dB" if face.quality else "-"
        print(f"  face {i}: box ({box}), score {face.score:.3f}, degradation {verdict}, N={face.N} tau={face.tau}, "
              f"low-frequency PSNR {psnr}, flags {list(face.flags) or 'none'}")
    if result.output is not None:
        args.output.write_bytes(result.output)
    meta_path = args.output.with_name(args.output.name + ".dr2.json")
    meta_path.write_bytes(result.metadata_json)
    print(f"wrote {args.output} and {meta_path}")


if __name__ == "__main__":
    main()

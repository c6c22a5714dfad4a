"""Write a random-weight Wan 2.1 T2V directory with the real configuration (diffusers format, offline).

    python tools/build_real_wan.py --size 1.3b --out runs/real_wan/1.3b                # the full 1.3B (2.9 GB bf16)
    python tools/build_real_wan.py --size 14b --layers 2 --vae tiny --out runs/real_wan/14b_2layers

The transformer, VAE and scheduler are the released configurations (``--layers`` lowers only the depth); the text
encoder has UMT5-XXL's 4096-wide output on ``--text-layers`` layers. Point ``model.path`` (or ``--set model.path=``)
at the result.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from video_branch.models.real_shapes import SIZES, build_real_wan, parameter_count, transformer_config  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=SIZES, required=True, help="Wan 2.1 T2V size")
    parser.add_argument("--out", type=Path, required=True, help="output directory (must not exist, or be empty)")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the real depth)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="stored dtype")
    parser.add_argument("--vae", choices=("real", "tiny"), default="real", help="the real AutoencoderKLWan or a tiny "
                        "one with the same latent layout")
    parser.add_argument("--text-layers", type=int, default=1, help="layers of the 4096-wide text encoder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.layers is not None and args.layers < 1:
        parser.error(f"--layers: expected a positive integer, got {args.layers}")
    if args.text_layers < 1:
        parser.error(f"--text-layers: expected a positive integer, got {args.text_layers}")
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"--out: {args.out} exists and is not empty")
    started = time.time()
    build_real_wan(args.out, args.size, num_layers=args.layers, dtype=args.dtype, text_layers=args.text_layers,
                   vae=args.vae, seed=args.seed)
    n = parameter_count(transformer_config(args.size, args.layers))
    print(f"wrote {args.out}: Wan 2.1 {args.size}, transformer {n / 1e9:.3f} B parameters, "
          f"{args.vae} VAE ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

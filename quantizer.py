"""Old command form, kept for compatibility with the seed project.

    python quantizer.py NETWORK CHECKPOINT NUM_CLASSES ALGORITHM BITS

NETWORK (50|101) and NUM_CLASSES are validated and otherwise ignored: the new tool reads any
checkpoint. ALGORITHM 1 = bin, 2 = fixed-point. This runs
``adjq-quantize-checkpoint CHECKPOINT --algorithm ... --bits BITS``.
"""

import sys

from adj_quant.cli import quantize_checkpoint
from adj_quant.errors import OneLineParser, UserError, cli_main

OLD_ALGORITHMS = {"1": "bin", "2": "fixed-point"}


@cli_main
def main(argv=None):
    p = OneLineParser(
        prog="python quantizer.py",
        description="Old form of adjq-quantize-checkpoint (see docs/checkpoint_quantization.md).",
    )
    p.add_argument("network", metavar="NETWORK",
                   help="ResNet depth, 50 or 101 (validated, not needed)")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint prefix or directory")
    p.add_argument("num_classes", metavar="NUM_CLASSES",
                   help="number of classes (validated, not needed)")
    p.add_argument("algorithm", metavar="ALGORITHM", help="1 = bin, 2 = fixed-point")
    p.add_argument("bits", metavar="BITS", help="bits per value")
    a = p.parse_args(argv)
    if a.network not in ("50", "101"):
        raise UserError(f"NETWORK {a.network!r} is not supported; use 50 or 101")
    if not a.num_classes.isdigit() or int(a.num_classes) < 1:
        raise UserError(f"NUM_CLASSES {a.num_classes!r} is not a positive integer; pass e.g. 10")
    if a.algorithm not in OLD_ALGORITHMS:
        raise UserError(f"ALGORITHM {a.algorithm!r} is not supported; "
                        "use 1 (bin) or 2 (fixed-point)")
    try:
        bits = int(a.bits)
    except ValueError:
        raise UserError(f"BITS {a.bits!r} is not an integer; pass e.g. 8") from None
    new = [a.checkpoint, "--algorithm", OLD_ALGORITHMS[a.algorithm], "--bits", str(bits)]
    print("note: old form; same as: adjq-quantize-checkpoint " + " ".join(new), file=sys.stderr)
    return quantize_checkpoint.main(new)


if __name__ == "__main__":
    sys.exit(main())

"""Score a (quantized) network with the MicroNet cost (EfficientNet-B0 by default; --model).

    adjq-score --weight_bits 32 --act_bits 32        # the float model
    adjq-score --weight_bits 4 --act_bits 4
    adjq-score --quant_info quant_info.json --json
    adjq-score --model keras:model.keras --weight_bits 4 --act_bits 4   # your own network

Prints the official MicroNet counts (params, multiplies, adds, ops, score_micronet) and the
Adjustable Quantization submission's own counting (score_adjq). ``--json`` prints exactly
one JSON object: params, multiplies, adds, ops (official counts), score_micronet, score_adjq.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from adj_quant.bits import is_bit_width
from adj_quant.cli.start import start
from adj_quant.errors import OneLineParser, UserError, cli_main

_DEFAULT_BITS = 8


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="adjq-score", description=__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet_b0", metavar="NAME",
                   help="the declared network to count (default efficientnet_b0; also "
                        "mobilenet_v2, mobilenet_v2_140, resnet_v1_50, mixnet_s, ...), or "
                        "keras:PATH, a saved float Keras model, imported as train.py imports it "
                        "(its own class count; --num_classes and the multipliers do not apply)")
    p.add_argument("--img_size", type=int, default=224,
                   help="input image side in pixels (default 224)")
    p.add_argument("--num_classes", type=int, default=1000,
                   help="classes of the Logits layer (default 1000)")
    p.add_argument("--width_multiplier", type=float, default=1.0,
                   help="channel multiplier of the network (default 1.0 = as published)")
    p.add_argument("--depth_multiplier", type=float, default=1.0,
                   help="multiplier of the blocks per stage (default 1.0 = as published)")
    p.add_argument("--weight_bits", type=int, default=None,
                   help="bits of every weight, 2..8, or 32 together with --act_bits 32 for the "
                        "float model (default 8)")
    p.add_argument("--act_bits", type=int, default=None,
                   help="bits of every layer-input activation, 2..8, or 32 together with "
                        "--weight_bits 32 for the float model (default 8)")
    p.add_argument("--swish_bits", type=int, default=None,
                   help="bits of the swish inputs: 2..8, 0 = trainable (counted at --act_bits), "
                        "-1 = not quantized (default 8; ignored for the float model)")
    p.add_argument("--bias_bits", type=int, default=None,
                   help="bits of the folded biases, 2..8, or 0 for float biases "
                        "(default 8; ignored for the float model)")
    p.add_argument("--quant_info", default=None, metavar="PATH",
                   help="per-channel bits from a quant_info.json written by training "
                        "(instead of the --*_bits flags), or a run / stage directory: the "
                        "quant_info.json of its last finished stage, and the network it trained")
    p.add_argument("--sparsity", type=float, default=None, metavar="S",
                   help="fraction of zero weights, in [0, 1), charged to every conv, depthwise "
                        "and FC weight tensor (a 1-bit mask per weight, fewer multiplies and "
                        "adds; docs/metric.md, 'Sparsity'); with --quant_info: its per-layer "
                        "sparsity is used instead (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: params, multiplies, adds, ops (official counts), "
                        "score_micronet, score_adjq")
    p.add_argument("--per_layer", action="store_true",
                   help="also print the official counts of every layer and element op")
    p.add_argument("--no_freebie", action="store_true",
                   help="do not count an all-float model at 16 bits (the MicroNet 16-bit freebie)")
    return p


def _validate(args) -> None:
    from adj_quant.recipe.config import MAX_IMG_SIZE, MAX_MULTIPLIER

    if not 0 < args.img_size <= MAX_IMG_SIZE:
        raise UserError(f"--img_size {args.img_size}: give an image size from 1 to "
                        f"{MAX_IMG_SIZE}, e.g. 224")
    if args.num_classes <= 0:
        raise UserError(f"--num_classes {args.num_classes}: give a positive number of classes, "
                        f"e.g. 1000")
    for flag in ("width_multiplier", "depth_multiplier"):
        value = getattr(args, flag)
        if not 0 < value <= MAX_MULTIPLIER:  # also refuses nan and inf
            raise UserError(f"--{flag} {value}: give a positive multiplier up to "
                            f"{MAX_MULTIPLIER:g}, e.g. 1.0")
    from adj_quant import nets

    if args.model.startswith("keras:"):
        path = args.model[len("keras:"):]
        if not os.path.isfile(path):
            raise UserError(f"--model {args.model}: no Keras model file {path!r}; pass "
                            "keras:PATH of a model saved with model.save('model.keras')")
    elif args.model not in nets.names():
        raise UserError(f"--model {args.model!r} is not a known network; known networks: "
                        f"{', '.join(nets.names())} (or keras:PATH)")
    if args.json and args.per_layer:
        raise UserError("--json and --per_layer both given: --json prints only the totals; "
                        "drop one of them")
    bit_flags = [f"--{f}" for f in ("weight_bits", "act_bits", "swish_bits", "bias_bits")
                 if getattr(args, f) is not None]
    if args.quant_info is not None:
        if bit_flags:
            raise UserError(f"--quant_info and {bit_flags[0]} both given: use either a "
                            f"quant_info.json or uniform --*_bits flags, not both")
        if os.path.isdir(args.quant_info):
            args.quant_info, args.network = _from_run(args.quant_info)
        if not os.path.isfile(args.quant_info):
            raise UserError(f"--quant_info {args.quant_info}: no such file — pass the "
                            f"quant_info.json written by training")
        return
    w = _DEFAULT_BITS if args.weight_bits is None else args.weight_bits
    a = _DEFAULT_BITS if args.act_bits is None else args.act_bits
    args.weight_bits, args.act_bits = w, a
    if w == 32 and a == 32:
        return
    for flag, value in (("--weight_bits", w), ("--act_bits", a)):
        if value == 32:
            other = "--act_bits" if flag == "--weight_bits" else "--weight_bits"
            raise UserError(f"{flag} 32 with {other} {a if other == '--act_bits' else w}: "
                            f"32 means float and needs --weight_bits 32 --act_bits 32; "
                            f"quantized bits must be in [2, 8]")
        if not is_bit_width(value):
            raise UserError(f"{flag} {value}: bits must be in [2, 8] (or --weight_bits 32 "
                            f"--act_bits 32 for the float model)")
    if args.swish_bits is not None and not (is_bit_width(args.swish_bits)
                                            or args.swish_bits in (0, -1)):
        raise UserError(f"--swish_bits {args.swish_bits}: use 2..8, 0 (trainable, counted at "
                        f"--act_bits) or -1 (not quantized)")
    if args.bias_bits is not None and not (is_bit_width(args.bias_bits) or args.bias_bits == 0):
        raise UserError(f"--bias_bits {args.bias_bits}: use 2..8, or 0 for float biases")


def _from_run(directory: str) -> tuple[str, dict | None]:
    """``(quant_info.json, the network's spec)`` of a stage or run directory."""
    from adj_quant.checkpoint_paths import last_finished_stage

    stage = directory if os.path.exists(os.path.join(directory, "quant_info.json")) else (
        last_finished_stage(directory))
    if stage is None or not os.path.exists(os.path.join(stage, "quant_info.json")):
        raise UserError(f"--quant_info {directory}: no quant_info.json in this directory or "
                        "its last finished stage; run eval.py on the checkpoint to write one")
    spec = os.path.join(stage, "model_spec.json")
    network = None
    if os.path.exists(spec):
        with open(spec, encoding="utf-8") as f:
            network = json.load(f)
    return os.path.join(stage, "quant_info.json"), network


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.2f}"


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start()
    _validate(args)
    from adj_quant import cost, nets
    from adj_quant.quant_info import load_quant_info
    from adj_quant.sparsity import check_sparsity
    if getattr(args, "network", None):  # a run directory: the network it trained
        from adj_quant.checkpoints import ModelSpec
        arch = ModelSpec.from_json(args.network).arch
    elif args.model.startswith("keras:"):
        from adj_quant.recipe.stages import keras_model

        arch = keras_model(args.model)[0]
    else:
        arch = nets.build(args.model, num_classes=args.num_classes,
                          width_multiplier=args.width_multiplier,
                          depth_multiplier=args.depth_multiplier)
    if args.quant_info is not None:
        if args.sparsity is not None:
            raise UserError(f"--sparsity {args.sparsity} with --quant_info: the file gives "
                            "each layer's sparsity; drop one of the two")
        bits = load_quant_info(args.quant_info, arch)
        what = f"bits from {args.quant_info}"
    else:
        swish = _DEFAULT_BITS if args.swish_bits is None else args.swish_bits
        bias = _DEFAULT_BITS if args.bias_bits is None else (args.bias_bits or None)  # 0: float
        sparsity = check_sparsity(args.sparsity or 0.0, "--sparsity")
        bits = cost.BitAssignment.uniform(arch, args.weight_bits, args.act_bits, swish, bias,
                                          sparsity=sparsity)
        if bits.is_float():
            what = "float model (weights and activations 32 bits)"
        else:
            what = (f"weights {args.weight_bits} bits, activations {args.act_bits} bits, "
                    f"swish {'float' if swish == -1 else (args.act_bits if swish == 0 else swish)}"
                    f", biases {'float' if bias is None else bias}")
        if sparsity:
            what += f", {sparsity:g} of every weight tensor zero"
    official = cost.micronet_cost(bits, args.img_size, arch=arch, per_layer=args.per_layer,
                                  freebie=not args.no_freebie)
    own = cost.micronet_cost(bits, args.img_size, arch=arch, style="adjq")
    mn, aq = official.as_floats(), own.as_floats()
    if args.json:
        print(json.dumps({"params": mn["params"], "multiplies": mn["multiplies"],
                          "adds": mn["adds"], "ops": mn["ops"], "score_micronet": mn["score"],
                          "score_adjq": aq["score"]}))
        return 0
    freebie = (not args.no_freebie) and bits.is_float()
    params = dict(arch.params)
    classes = params.pop("num_classes", arch.num_classes)
    described = ", ".join(f"{k.replace('_multiplier', '')} {v:g}" for k, v in params.items())
    print(f"{arch.name} ({described}), {args.img_size}x{args.img_size}, {classes} classes: "
          f"{what}")
    print(f"{'':<12}{'micronet (official)':>24}{'adjq (submission)':>24}")
    for key in ("params", "multiplies", "adds", "ops"):
        print(f"{key:<12}{_fmt(mn[key]):>24}{_fmt(aq[key]):>24}")
    print(f"score_micronet = {mn['score']:.6f}   official MicroNet counting"
          f"{' (16-bit freebie: params and multiplies at 16 bits)' if freebie else ''}; "
          f"P_ref {cost.P_REF:g}, O_ref {cost.O_REF:g}")
    print(f"score_adjq     = {aq['score']:.6f}   the submission's own counting (adds at the "
          f"multiply width; no pooling, SE scale/sigmoid or residual adds)")
    if args.per_layer:
        print()
        print("official counts per layer / element op:")
        print(f"{'scope':<28}{'kind':<14}{'params':>16}{'multiplies':>18}{'adds':>18}")
        for row in official.per_layer:
            print(f"{row['scope']:<28}{row['kind']:<14}{_fmt(row['params']):>16}"
                  f"{_fmt(row['multiplies']):>18}{_fmt(row['adds']):>18}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

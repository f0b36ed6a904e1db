"""``adjq-convert``: published float ImageNet weights (Keras applications, the TPU
EfficientNet-B0 checkpoint, slim's MobileNetV2 / ResNet-V1-50 checkpoints) as a finished
``pretrain`` stage of a run. The conversion is :func:`pretrained.convert.convert`; see
``pretrained/README.md``."""

from __future__ import annotations

import argparse

from adj_quant.cli.start import start
from adj_quant.errors import OneLineParser, cli_main
from pretrained.convert import convert

EXAMPLES = """\
examples:
  # Keras applications weights (downloaded by keras.applications, or from the URLs in
  # pretrained/README.md); the network is recognised from the file
  adjq-convert efficientnetb0.h5 --output runs/b0_keras/pretrain
  adjq-convert mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.4_224.h5 \\
      --output runs/mnv2_140_keras/pretrain
  adjq-convert resnet50_weights_tf_dim_ordering_tf_kernels.h5 \\
      --output runs/resnet50_keras/pretrain

  # the official TPU EfficientNet-B0 checkpoint (tarball, directory or prefix)
  adjq-convert efficientnet-b0.tar.gz --output runs/b0_tpu/pretrain

  # slim checkpoints: MobileNetV2 has 1001 classes (0 = background), drop it
  adjq-convert mobilenet_v2_1.4_224.tgz --labels_offset 1 \\
      --output runs/mnv2_140/pretrain
  adjq-convert resnet_v1_50.ckpt --output runs/resnet50/pretrain

then: python eval.py --float --ckpt_path OUT --dataset IMAGENET_TFRECORDS --labels_offset 1
      python train.py --stage calibrate --run_dir RUN --model MODEL --dataset ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="adjq-convert",
        description="Convert published float ImageNet weights (Keras applications, the TPU "
                    "EfficientNet-B0 checkpoint, slim's MobileNetV2 / ResNet-V1-50 "
                    "checkpoints) into an adjq float checkpoint directory, written like a "
                    "finished pretrain stage.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", metavar="SOURCE",
        help="the weights: a Keras .weights.h5 / .h5 / .keras file, a TF checkpoint (prefix, "
             "one of its files, or the directory holding it), or the downloaded .tar.gz/.tgz")
    parser.add_argument(
        "--model", default=None,
        help="the declared network to convert into (efficientnet_b0, mobilenet_v2, "
             "mobilenet_v2_140, resnet_v1_50, resnet_v1_50_keras); default: the one the "
             "source holds")
    parser.add_argument(
        "--output", required=True, metavar="DIR",
        help="the checkpoint directory to write (RUN/pretrain makes it run RUN's pretrain "
             "stage, so the recipe starts at calibrate)")
    parser.add_argument(
        "--labels_offset", type=int, default=0,
        help="leading classes to drop from the logits: 1 for slim's 1001-class checkpoints "
             "(class 0 is background); 0 for 1000-class ones (Keras, TPU, slim ResNet-V1)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace --output if it exists (only a checkpoint directory is replaced)")
    return parser


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    start()
    from adj_quant.checkpoints import load_spec, resolve_checkpoint
    from adj_quant.recipe.stages import converted_pretrain_files

    out = convert(args.source, args.model, args.output, labels_offset=args.labels_offset,
                  overwrite=args.overwrite, stage_files=converted_pretrain_files)

    net = load_spec(resolve_checkpoint(out)).arch
    print(f"{out}: float {net.name} with {net.num_classes} classes, converted from "
          f"{args.source}")
    print(f"  check it:  python eval.py --float --ckpt_path {out} --dataset IMAGENET_DIR "
          "[--labels_offset 1 for slim TFRecords]")


if __name__ == "__main__":
    main()

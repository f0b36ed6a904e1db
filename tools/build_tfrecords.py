#!/usr/bin/env python
"""Build slim-format TFRecord shards from a folder of class folders.

    python tools/build_tfrecords.py --input_dir IMAGES --output_dir OUT [--validation_fraction 0.2]

``IMAGES`` holds one sub-folder per class (sorted folder names give label 0, 1, ...; with
``--labels_offset 1`` they start at 1 like slim's 1001-class ImageNet) with JPEG or PNG
files. ``OUT`` receives ``train-00000-of-0000N`` / ``validation-00000-of-0000M`` shards
with the features ``image/encoded``, ``image/format``, ``image/class/label``,
``image/class/text``, ``image/height``, ``image/width`` and ``image/filename``, plus
``labels.txt`` (``index:classname`` lines). ``adj_quant.recipe.data`` reads them as dataset
``imagenet`` with ``dataset_dir=OUT`` (``--dataset OUT``).

Each shard is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import math
import os
import struct
import sys
from dataclasses import dataclass

try:
    from adj_quant.errors import OneLineParser, UserError, cli_main
except ImportError:  # run as a script from a checkout: python tools/build_tfrecords.py
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from adj_quant.errors import OneLineParser, UserError, cli_main
import numpy as np

from adj_quant.files import write_atomic

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SPLITS = ("train", "validation")
DEFAULT_EXAMPLES_PER_SHARD = 1024
_READ_THREADS = 8


@dataclass(frozen=True)
class ImageFile:
    path: str
    label: int  # as written, i.e. including labels_offset
    class_name: str


# --------------------------------------------------------------------------- inputs


def list_class_folders(input_dir: str, labels_offset: int = 0) -> tuple[list[str], list[ImageFile]]:
    """Sorted class names and every JPEG/PNG file below ``input_dir/<class>/`` (recursively)."""
    if not os.path.isdir(input_dir):
        what = "is not a directory" if os.path.exists(input_dir) else "does not exist"
        raise UserError(f"--input_dir {input_dir} {what}; "
                        "pass a folder with one sub-folder of images per class")
    classes = sorted(
        entry.name for entry in os.scandir(input_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )
    if not classes:
        raise UserError(f"--input_dir {input_dir} has no class sub-folders; "
                        "put the images of each class in their own sub-folder")
    files = []
    for index, name in enumerate(classes):
        folder = os.path.join(input_dir, name)
        found = []
        for root, dirs, names in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            found.extend(os.path.join(root, n) for n in names
                         if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS))
        files.extend(ImageFile(path, index + labels_offset, name) for path in sorted(found))
    if not files:
        raise UserError("no .jpg/.jpeg/.png images in the class folders of "
                        f"--input_dir {input_dir}")
    return classes, files


def image_format_and_size(data: bytes, path: str) -> tuple[str, int, int]:
    """("JPEG" | "PNG", height, width) from the file's header; UserError for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return "PNG", height, width
    if data.startswith(b"\xff\xd8\xff"):
        size = _jpeg_size(data)
        if size is not None:
            return ("JPEG",) + size
    raise UserError(f"{path} is not a readable JPEG or PNG image; "
                    "delete or convert it and run again")


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from the first start-of-frame marker of a JPEG."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
            if pos + 9 > len(data):
                return None
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return (height, width) if height and width else None
        pos += 2 + length
    return None


def split_files(files: list[ImageFile], validation_fraction: float,
                seed: int) -> dict[str, list[ImageFile]]:
    """Stratified split: per class, round(fraction * n) files go to validation (at least one
    stays in train). Each split is shuffled with ``seed`` so shards mix the classes."""
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[ImageFile]] = {}
    for f in files:
        by_class.setdefault(f.label, []).append(f)
    out = {"train": [], "validation": []}
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = min(int(round(validation_fraction * len(members))), len(members) - 1)
        out["validation"].extend(members[i] for i in order[:n_val])
        out["train"].extend(members[i] for i in order[n_val:])
    for split in out:
        out[split] = [out[split][i] for i in rng.permutation(len(out[split]))]
    return out


# --------------------------------------------------------------------------- writing


def _int64(value: int):
    import tensorflow as tf

    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def _bytes(value: bytes):
    import tensorflow as tf

    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def make_example(data: bytes, image_format: str, height: int, width: int, label: int,
                 class_name: str, filename: str) -> bytes:
    import tensorflow as tf

    feature = {
        "image/encoded": _bytes(data),
        "image/format": _bytes(image_format.encode()),
        "image/class/label": _int64(label),
        "image/class/text": _bytes(class_name.encode()),
        "image/height": _int64(height),
        "image/width": _int64(width),
        "image/filename": _bytes(filename.encode()),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _load(item: ImageFile) -> bytes:
    try:
        with open(item.path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise UserError(f"cannot read {item.path}: {err.strerror}") from err
    image_format, height, width = image_format_and_size(data, item.path)
    return make_example(data, image_format, height, width, item.label, item.class_name,
                        os.path.basename(item.path))


def shard_name(split: str, index: int, num_shards: int) -> str:
    return f"{split}-{index:05d}-of-{num_shards:05d}"


def _write_split(items: list[ImageFile], output_dir: str, split: str, num_shards: int,
                 progress: bool) -> list[str]:
    import tensorflow as tf
    from tqdm import tqdm

    num_shards = max(1, min(num_shards, len(items)))
    bounds = np.linspace(0, len(items), num_shards + 1).astype(int)
    written = []
    bar = tqdm(total=len(items), desc=f"{split} images", unit="img", disable=not progress,
               leave=True)
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        for index in range(num_shards):
            name = shard_name(split, index, num_shards)
            final = os.path.join(output_dir, name)
            tmp = os.path.join(output_dir, f".{name}.tmp-{os.getpid()}")
            try:
                with tf.io.TFRecordWriter(tmp) as writer:
                    for record in pool.map(_load, items[bounds[index]:bounds[index + 1]]):
                        writer.write(record)
                        bar.update(1)
                tf.io.gfile.rename(tmp, final, overwrite=True)
            finally:
                if tf.io.gfile.exists(tmp):
                    tf.io.gfile.remove(tmp)
            written.append(final)
    bar.close()
    return written


def _existing_shards(output_dir: str, split: str) -> list[str]:
    import glob

    return sorted(glob.glob(os.path.join(glob.escape(output_dir), f"{split}-*-of-*")))


def _check_labels_file(path: str, lines: list[str]) -> None:
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as fh:
        old = [line.rstrip("\n") for line in fh if line.strip()]
    if old != lines:
        raise UserError(
            f"{path} lists other classes or labels than the class folders of --input_dir; "
            "use a new --output_dir or pass --overwrite to replace all shards"
        )


def write_class_folder_tfrecords(input_dir: str, output_dir: str, *,
                                 validation_fraction: float = 0.2, split: str | None = None,
                                 num_shards: int | None = None, seed: int = 0,
                                 labels_offset: int = 0, overwrite: bool = False,
                                 progress: bool = True) -> dict[str, list[str]]:
    """Write shards for the images in ``input_dir/<class>/``; returns the shard paths per split.

    With ``split`` ("train" or "validation") every image goes to that split (other splits
    already in ``output_dir`` are kept, and ``labels.txt`` must agree with the classes);
    otherwise a stratified ``validation_fraction`` of each class goes to validation.
    ``num_shards`` is the number of shards per split (default: one per 1024 images). Shards
    of the written splits already in ``output_dir`` are an error unless ``overwrite``."""
    if split is not None and split not in SPLITS:
        raise UserError(f"--split {split!r} is not one of: {', '.join(SPLITS)}")
    if split is None and not 0.0 <= validation_fraction < 1.0:
        raise UserError(f"--validation_fraction {validation_fraction} must be in [0, 1)")
    if num_shards is not None and num_shards < 1:
        raise UserError(f"--num_shards {num_shards} must be at least 1")
    if labels_offset < 0:
        raise UserError(f"--labels_offset {labels_offset} must be 0 or positive")

    classes, files = list_class_folders(input_dir, labels_offset)
    if split is not None:
        splits = {split: list(files[i]
                              for i in np.random.default_rng(seed).permutation(len(files)))}
    else:
        splits = split_files(files, validation_fraction, seed)
        splits = {name: items for name, items in splits.items() if items}

    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir} is a file; pass a directory")
    os.makedirs(output_dir, exist_ok=True)
    labels_path = os.path.join(output_dir, "labels.txt")
    label_lines = [f"{i + labels_offset}:{name}" for i, name in enumerate(classes)]
    owned = (split,) if split is not None else SPLITS  # splits this run replaces
    old = {name: _existing_shards(output_dir, name) for name in owned}
    if not overwrite:
        for name, paths in old.items():
            if paths:
                raise UserError(f"--output_dir {output_dir} already has {name} shards "
                                f"({os.path.basename(paths[0])}, ...); "
                                "pass --overwrite to replace them or use an empty directory")
        if split is not None:
            _check_labels_file(labels_path, label_lines)

    written = {}
    for name, items in splits.items():
        shards = num_shards or math.ceil(len(items) / DEFAULT_EXAMPLES_PER_SHARD)
        written[name] = _write_split(items, output_dir, name, shards, progress)
    for name in owned:  # shards left over from an earlier run would be read too
        for stale in set(old[name]) - set(written.get(name, [])):
            os.remove(stale)
    write_atomic(labels_path, "".join(line + "\n" for line in label_lines))
    return written


# --------------------------------------------------------------------------- test helper


def write_synthetic_class_folders(out_dir: str, num_classes: int = 3, per_class: int = 4,
                                  size: tuple[int, int] = (40, 50), seed: int = 0,
                                  image_format: str = "mixed") -> list[str]:
    """Write ``per_class`` small real images per class into ``out_dir/class_<k>/``.

    Images of class ``k`` are flat grey at level ``class_level(k, num_classes)`` plus mild
    noise, so a reader can check that labels and pixels agree. ``image_format`` is "png",
    "jpeg" or "mixed" (alternating). ``size`` is (height, width). Returns the class names."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    height, width = size
    names = []
    for k in range(num_classes):
        name = f"class_{k}"
        names.append(name)
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        level = class_level(k, num_classes) * 255.0
        for i in range(per_class):
            noise = rng.integers(-6, 7, size=(height, width, 3))
            pixels = np.clip(level + noise, 0, 255).astype(np.uint8)
            fmt = image_format if image_format != "mixed" else ("png" if i % 2 == 0 else "jpeg")
            if fmt == "png":
                data, ext = tf.io.encode_png(pixels).numpy(), "png"
            elif fmt == "jpeg":
                data, ext = tf.io.encode_jpeg(pixels, quality=95).numpy(), "jpg"
            else:
                raise ValueError(f"image_format must be png, jpeg or mixed, got {image_format!r}")
            with open(os.path.join(folder, f"img_{i:03d}.{ext}"), "wb") as fh:
                fh.write(data)
    return names


def class_level(k: int, num_classes: int) -> float:
    """Grey level in (0, 1) of class ``k`` in :func:`write_synthetic_class_folders`."""
    return (k + 1) / (num_classes + 1)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tools/build_tfrecords.py",
        description="Build slim-format TFRecord shards (train-*-of-* / validation-*-of-*) "
                    "and labels.txt from a folder with one sub-folder of JPEG/PNG images per "
                    "class.")
    parser.add_argument("--input_dir", required=True,
                        help="folder with one sub-folder per class; "
                             "sorted folder names give labels 0, 1, ...")
    parser.add_argument("--output_dir", required=True,
                        help="folder to write the shards and labels.txt into")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--validation_fraction", type=float, default=0.2,
                       help="share of each class written to the validation split (default: 0.2)")
    which.add_argument("--split", choices=SPLITS,
                       help="write every image to this one split instead of splitting "
                            "(e.g. to build train and validation from separate folders)")
    parser.add_argument("--num_shards", type=int, default=None,
                        help="shards per split "
                             f"(default: one per {DEFAULT_EXAMPLES_PER_SHARD} images)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the train/validation split and shuffling (default: 0)")
    parser.add_argument("--labels_offset", type=int, default=0,
                        help="add this to every label; 1 gives slim's 1001-class convention "
                             "(default: 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace shards of the same split already in --output_dir")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    written = write_class_folder_tfrecords(
        args.input_dir, args.output_dir, validation_fraction=args.validation_fraction,
        split=args.split, num_shards=args.num_shards, seed=args.seed,
        labels_offset=args.labels_offset, overwrite=args.overwrite, progress=not args.quiet)
    for split, paths in written.items():
        print(f"{split}: {len(paths)} shard(s) in {args.output_dir}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()

"""Every command the README, docs/results.md and the tools' ``--help`` texts show runs as
shown.

The commands are extracted from the text (not listed here), so a command added to the
README or to a help text is tested without touching this file. Each runs in-process on a
copy of the tiny trained digits run, placed where the command expects it (``runs/digits``,
``runs/x``), with the tiny-model flags added; placeholders (``CKPT``, ``B``, ``{a,b}``)
become real values. Commands on ImageNet shards that are not here are parsed and their
configuration resolved, not run. ``ADJQ_TIME_COMMANDS=1`` prints each command's time.
"""

import contextlib
import itertools
import os
import re
import runpy
import shlex
import shutil
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TINY, build_tool

from adj_quant.cli import evaluate as eval_cli
from adj_quant.cli import export as export_cli
from adj_quant.cli import pareto as pareto_cli
from adj_quant.cli import quantize_checkpoint as quantize_cli
from adj_quant.cli import score as score_cli
from adj_quant.cli import sweep as sweep_cli
from adj_quant.cli import train as train_cli
from adj_quant.recipe.config import resolve

PROGRAMS = (r"(?:python (?:train|eval|quantizer)\.py|adjq-[a-z-]+"
            r"|(?:python )?tools/build_tfrecords\.py|quantizer\.py)")
COMMAND_LINE = re.compile(rf"^\s*(?:\$ )?({PROGRAMS}(?:\s.*)?)$")
INLINE = re.compile(rf"`({PROGRAMS}[^`]*)`")
#: The tiny model's flags minus the ones a command may set itself.
TINY_MODEL = [a for a in TINY if a != "--no-progress"]


def _join_continuations(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


#: The documents whose commands are run: the front door and the results it points to.
DOCUMENTS = ("README.md", os.path.join("docs", "results.md"))


def readme_commands() -> list[str]:
    text = "\n".join(open(os.path.join(ROOT, name), encoding="utf-8").read()
                     for name in DOCUMENTS)
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
        for line in _join_continuations(block):
            for part in line.split("&&"):
                if m := COMMAND_LINE.match(part):
                    found.append(m.group(1))
    # Inline commands; a bare tool name (`adjq-eval`) names the tool, it is not a command.
    found += [m for m in INLINE.findall(text) if len(shlex.split(m)) > 1 + m.startswith("python")]
    return found


def help_commands() -> list[str]:
    parsers = [train_cli, eval_cli, export_cli]
    texts = []
    for module in parsers:
        with pytest.raises(SystemExit), contextlib.redirect_stdout(_Sink()) as sink:
            module.parse(["--help"])
        texts.append(sink.text)
    texts.append(score_cli.build_parser().format_help())
    texts.append(quantize_cli.build_parser().format_help())
    found = []
    for text in texts:
        for line in _join_continuations(text):
            if m := COMMAND_LINE.match(line):
                found.append(m.group(1))
    return found


class _Sink:
    def __init__(self):
        self.text = ""

    def write(self, text):
        self.text += text

    def flush(self):
        pass


def expand(command: str) -> list[list[str]]:
    """Drop the trailing comment, expand ``{a,b,c}`` into one command per choice."""
    command = re.sub(r"\s+#.*$", "", command).strip()
    words = shlex.split(command)
    choices = [re.fullmatch(r"\{(.+)\}", w).group(1).split(",") if re.fullmatch(r"\{.+\}", w)
               else [w] for w in words]
    return [list(c) for c in itertools.product(*choices)]


def all_commands() -> list[list[str]]:
    seen, out = set(), []
    for command in readme_commands() + help_commands():
        for words in expand(command):
            if tuple(words) not in seen:
                seen.add(tuple(words))
                out.append(words)
    return out


# The order a user follows: train, export (eval.py --tflite reads the export), evaluate,
# then the other tools.
ORDER = ("train.py", "adjq-export", "eval.py", "adjq-score", "adjq-quantize-checkpoint",
         "quantizer.py", "tools/build_tfrecords.py", "adjq-sweep", "adjq-pareto")


def _program(words):
    name = words[1] if words[0] == "python" else words[0]
    return name.replace("adjq-eval", "eval.py").replace("adjq-train", "train.py")


def test_the_extraction_finds_the_documented_commands():
    commands = [" ".join(c) for c in all_commands()]
    # The example and one command of each tool must be among them.
    assert any("--stage adjustable --bits_trainable --iter_train --ckpt_path runs/x/qat8" in c
               for c in commands)
    for tool in ("python train.py", "python eval.py", "adjq-export", "adjq-score",
                 "adjq-quantize-checkpoint", "quantizer.py", "build_tfrecords.py"):
        assert any(tool in " ".join(c.split()[:2]) for c in commands), tool
    assert len(commands) >= 20


def _placeholders(words, cwd):
    """Real values for the placeholders of the documented commands."""
    program = _program(words)
    out = []
    for i, w in enumerate(words):
        if w == "CKPT":  # the old quantizer.py form gets its own checkpoint (another output)
            w = {"adjq-quantize-checkpoint": "runs/digits/qat8",
                 "quantizer.py": "runs/digits/pretrain"}.get(program, "runs/digits/finetune")
        elif w == "B":
            w = "8"
        elif w == "model.tflite":
            w = "runs/digits/finetune/model_int8.tflite"
        elif w == "quant_info.json" and i > 0 and words[i - 1] == "--quant_info":
            w = "runs/digits/finetune"
        elif w == "CLASS_FOLDERS":
            w = str(_class_folders(cwd))
        elif w == "DIR":
            w = "shards"
        elif w == "runs/resnet/model.ckpt-100":
            w = "runs/digits/qat8"
        elif w == "keras:model.keras":
            _keras_model(cwd / "model.keras")
        elif program in ("adjq-sweep", "train.py") and w.startswith("configs/"):
            w = os.path.join(ROOT, w)  # a shipped sweep or config file
        elif program == "adjq-pareto" and w.endswith(".csv") and not os.path.exists(cwd / w):
            # The documented sweep's csv: the one measured and shipped beside docs/pareto.png.
            (cwd / w).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(os.path.join(ROOT, "docs", "digits_pareto.csv"), cwd / w)
        out.append(w)
    return out


def _keras_model(path):
    """A small saved Keras model with the digits' 10 classes."""
    import keras

    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)


def _class_folders(cwd):
    from PIL import Image

    root = cwd / "class_folders"
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
                root / label / f"{k}.png")
    return root


def _run(words):
    """Run one documented command in-process; returns the exit code."""
    program = _program(words)
    args = words[2:] if words[0] == "python" else words[1:]
    try:
        if program == "train.py":
            train_cli.main([*args, *TINY_MODEL, "--max_epoch", "0.1", "--no-progress"])
        elif program == "eval.py":
            eval_cli.main([*args, "--max_val_images", "64", "--no-progress"])
        elif program == "adjq-export":
            export_cli.main([*args, "--max_val_images", "64", "--representative_images", "16",
                             "--no-progress", "--overwrite"])
        elif program == "adjq-score":
            score_cli.main(args)
        elif program == "adjq-quantize-checkpoint":
            quantize_cli.main([*args, "--json", "--overwrite"])
        elif program == "quantizer.py":
            with _argv(["quantizer.py", *args]):
                runpy.run_path(os.path.join(ROOT, "quantizer.py"), run_name="__main__")
        elif program == "tools/build_tfrecords.py":
            build_tool().main([*args, "--quiet"])
        elif program == "adjq-sweep":  # planned and listed, not trained (an hour on 2 cores)
            sweep_cli.main([*[a for a in args if a != "--dry_run"], "--dry_run"])
        elif program == "adjq-pareto":
            pareto_cli.main(args)
        else:
            raise AssertionError(f"no runner for {words}")
    except SystemExit as exit_info:
        return exit_info.code or 0
    return 0


@contextlib.contextmanager
def _argv(argv):
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _is_elsewhere(words) -> bool:
    """A command on data that is not on this machine (ImageNet shards)."""
    return any(w.startswith("/data/") for w in words)


def _resolves(words):
    """Parse the command and resolve its configuration for its stage."""
    cli = train_cli.parse(words[2:])
    stage = cli.pop("stage", None)
    cli["config"] = os.path.join(ROOT, cli["config"]) if cli.get("config") else None
    options = resolve(cli, stage)
    assert options.dataset.startswith("/data/")


def test_every_documented_command_runs(digits_run, tmp_path, monkeypatch, capsys):
    commands = sorted(all_commands(), key=lambda w: ORDER.index(_program(w)))
    main_cwd = tmp_path / "main"
    shutil.copytree(digits_run, main_cwd / "runs" / "digits")
    # A run from before with its first three stages: the single-stage example starts a new run.
    x_cwd = tmp_path / "x"
    for stage in ("pretrain", "calibrate", "qat8"):
        shutil.copytree(digits_run / stage, x_cwd / "runs" / "x" / stage)
    failures = []
    for words in commands:
        if _is_elsewhere(words):
            _resolves(words)
            continue
        cwd = x_cwd if any("runs/x" in w for w in words) else main_cwd
        monkeypatch.chdir(cwd)
        words = _placeholders(words, cwd)
        started = time.perf_counter()
        code = _run(words)
        err = capsys.readouterr().err
        if os.environ.get("ADJQ_TIME_COMMANDS"):
            with capsys.disabled():
                print(f"{time.perf_counter() - started:6.1f}s  {' '.join(words)}")
        if code != 0 or "Traceback" in err:
            failures.append(f"{' '.join(words)} -> exit {code}: {err.strip()[-300:]}")
        elif "runs/x/qat8" in words and "distilling from" not in err:
            failures.append(f"{' '.join(words)}: no line naming the teacher from runs/x")
    assert not failures, "\n".join(failures)
    assert (x_cwd / "runs" / "digits" / "adjustable" / "result.json").exists()
    assert (main_cwd / "runs" / "digits" / "finetune" / "model_int8.tflite").exists()


def test_imagenet_commands_are_parsed_not_run():
    elsewhere = [w for w in all_commands() if _is_elsewhere(w)]
    assert elsewhere, "the README shows ImageNet commands"
    for words in elsewhere:
        _resolves(words)

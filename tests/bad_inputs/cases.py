"""The cases: bad (and a few good) command lines of every command, as tables.

A case is a name, a category, the command (a console script, or the checkout's
``quantizer.py``), its arguments and, where the issue says what must happen, an
expectation (:mod:`.expectations`). Arguments hold placeholders, filled per case by
:class:`.fixtures.Ctx`: ``{run}`` a new run directory, ``{case}`` the case's directory,
``{missing}`` a path that does not exist, ``{dir}`` an empty directory, ``{bin}`` a binary
file, ``{file}`` a text file, ``{f:NAME}`` a bad file, ``{repo}`` the checkout; and of the
trained fixture: ``{fix}`` a copy of the trained run, ``{partial}`` a copy of the
interrupted one, ``{corrupt/STAGE/KIND/best|latest}`` the stage directory of a copy whose
checkpoint is corrupted (``corruptp/...``: that checkpoint's prefix). An argument
``#{...}`` only sets up its placeholder; ``#copy-lone`` copies qat8 out of its run. What a
case needs (:func:`.fixtures.needs`) follows from its placeholders.

:data:`FAST` names the cases that need no trained fixture and end before any training: the
test suite runs them (tests/test_bad_inputs.py); ``python -m tests.bad_inputs`` runs all.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

from .expectations import (
    all_of,
    config_history_written,
    creates,
    exits_nonzero,
    exits_zero,
    mentions,
    mentions_once,
    no_nonfinite_checkpoint,
    no_orphans,
    not_after_the_work,
    not_mentions,
    refused_unchanged,
    snapshot_partial,
)
from .fixtures import CORRUPTIONS, needs

try:
    from conftest import TINY
except ImportError:  # python -m tests.bad_inputs: tests/ is not on the path
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from conftest import TINY

TIMEOUT = 300
HEAVY_TIMEOUT = 300  # floor for the cases that train a quantized stage or two processes


@dataclasses.dataclass
class Case:
    name: str
    category: str
    command: str                  # a console script (adjq-train, ...) or quantizer.py
    args: list[str]
    expect: Callable | None = None
    desc: str = ""
    setup: Callable | None = None
    runner: str | None = None     # None | "concurrent" | "disk_full"
    timeout: int = 0              # at least this many seconds, whatever --timeout says

    def __post_init__(self):
        self.args = list(self.args)
        if not self.desc:
            self.desc = " ".join([self.command, *self.args])
        if "adjustable" in self.args or self.runner or self.category == "guard":
            self.timeout = max(self.timeout, HEAVY_TIMEOUT)  # 30-100 s on 2 busy cores

    @property
    def needs(self) -> set[str]:
        return needs(self.args)


PRE = ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "0.1"]
ADJ = ["--stage", "adjustable", "--run_dir", "{fix}", *TINY, "--max_epoch", "0.1",
       "--warm_up_epoch", "0", "--iter_train_freq", "1"]
RESUME = ["--stage", "pretrain", "--run_dir", "{partial}", *TINY, "--max_epoch", "0.3"]
ONE_STEP = ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--batch_size", "140",
            "--max_epoch", "0.3"]   # 1437 // 140 = 10 steps: one step per mini-epoch
SINGLE = ["--stage", "adjustable", "--bits_trainable", "--iter_train", "--run_dir",
          "{case}/new", *TINY, "--max_epoch", "0.1"]
SWEEP = "{repo}/configs/sweeps/digits_pareto.toml"
GOOD_CKPT = "{fix}/pretrain"

# (flag, base, -1 refused, 1e39 refused, 1e39 tried); each flag is tried with inf, nan, -1.
FLOAT_FLAGS = [
    ("lr", PRE, True, True, True),
    ("lr_decay", PRE, True, False, True),
    ("max_epoch", PRE, True, False, False),       # 1e39: a valid but endless run
    ("swa_freq", PRE, True, False, False),
    ("swa_delay", PRE, False, False, False),
    ("width_multiplier", PRE, True, False, True),
    ("depth_multiplier", PRE, True, False, True),
    ("eval_crop", PRE, True, False, False),
    ("dropout", PRE, True, False, False),
    ("drop_connect", PRE, True, False, False),
    ("bn_momentum", PRE, False, False, False),
    ("lr_bits", ADJ, True, False, True),
    ("metric", ADJ, True, False, True),
    ("warm_up_epoch", ADJ, True, False, False),
    ("alpha", ADJ, False, False, True),
    ("beta", ADJ, False, False, True),
    ("gamma", ADJ, False, False, True),
]

INT_FLAGS = [
    ("img_size", "0"), ("img_size", "-32"), ("img_size", "abc"), ("img_size", "1"),
    ("batch_size", "0"), ("batch_size", "5000"), ("seed", "-1"), ("seed", str(2 ** 70)),
    ("weight_bits", "1"), ("weight_bits", "9"), ("weight_bits", "3.5"),
    ("swish_bits", "3"), ("bias_bits", "1"), ("range", "0"), ("reinit", "0"),
    ("keep_checkpoints", "-1"), ("num_classes", "5"), ("labels_offset", "3"),
]


def _float_flag_cases() -> list[Case]:
    out = []
    for flag, base, neg_refused, big_refused, big in FLOAT_FLAGS:
        stage = "pretrain" if base is PRE else "adjustable"
        for value, tag in (("inf", "inf"), ("nan", "nan"), ("-1", "neg"), ("1e39", "1e39")):
            if value == "1e39" and not big:
                continue
            expect = None
            if value in ("inf", "nan"):
                expect = exits_nonzero(f"--{flag} {value} must be refused (issue 13, section 3)")
            elif value == "-1" and neg_refused:
                expect = exits_nonzero(f"a negative --{flag} must be refused")
            elif value == "1e39" and big_refused:
                expect = exits_nonzero(f"--{flag} above float32's range must be refused")
            out.append(Case(f"train_{flag}_{tag}", "float-flag", "adjq-train",
                            [*base, f"--{flag}={value}"], expect,
                            f"adjq-train --stage {stage} --{flag}={value}"))
    return out


#: Expectations of some integer-flag cases (by case name).
INT_EXPECT = {
    "train_range_0": all_of(exits_nonzero("--range 0 is no preset"),
                            not_mentions("--unknown", "the message names a flag --unknown "
                                         "that does not exist (issue 28)"),
                            mentions("--range", "the message does not name --range")),
}


def _int_flag_cases() -> list[Case]:
    out = []
    for flag, value in INT_FLAGS:
        tag = value.replace("-", "neg").replace(".", "p") if len(value) < 8 else "huge"
        name = f"train_{flag}_{tag}"
        out.append(Case(name, "int-flag", "adjq-train", [*PRE, f"--{flag}={value}"],
                        INT_EXPECT.get(name),
                        desc=f"adjq-train --stage pretrain --{flag} {value}"))
    return out


# name, category, arguments, expectation, description
TRAIN = [
    ("train_lr_neg_space", "float-flag", [*PRE, "--lr", "-1e-3"],
     all_of(exits_nonzero("a negative --lr must be refused"),
            not_mentions("expected one argument",
                         "'--lr -1e-3' is not parsed (argparse: expected one argument)")),
     "adjq-train --lr -1e-3 (space-separated negative)"),
    ("train_lr_bits_neg_space", "float-flag", [*ADJ, "--lr_bits", "-0.5"],
     all_of(exits_nonzero("a negative --lr_bits must be refused"),
            not_mentions("expected one argument",
                         "'--lr_bits -0.5' is not parsed (argparse: expected one argument)")),
     "adjq-train --lr_bits -0.5 (space-separated)"),
    ("train_lr_neg_equals", "float-flag", [*PRE, "--lr=-1e-3"],
     exits_nonzero("a negative --lr must be refused"), "adjq-train --lr=-1e-3"),
    ("train_iter_train_freq_0", "int-flag", [*ADJ, "--iter_train_freq", "0"], None,
     "adjq-train --stage adjustable --iter_train_freq 0"),
    ("train_calib_images_0", "int-flag",
     ["--stage", "calibrate", "--run_dir", "{run}", *TINY, "--ckpt_path", "{fix}/pretrain",
      "--calib_images", "0"], None, "adjq-train --stage calibrate --calib_images 0"),
    ("train_stage_bogus", "choice", ["--stage", "bogus", "--run_dir", "{run}", *TINY], None,
     "adjq-train --stage bogus"),
    ("train_augment_bogus", "choice", [*PRE, "--augment", "sideways"], None,
     "adjq-train --augment sideways"),
    ("train_metric_style_bogus", "choice", [*ADJ, "--metric_style", "best"], None,
     "adjq-train --metric_style best"),
    ("train_dataset_missing", "data", [*PRE, "--dataset", "{missing}"], None,
     "adjq-train --dataset /no/such/dir"),
    ("train_dataset_binary", "data", [*PRE, "--dataset", "{bin}"], None,
     "adjq-train --dataset BINARY_FILE"),
    ("train_dataset_empty_dir", "data", [*PRE, "--dataset", "{dir}"], None,
     "adjq-train --dataset EMPTY_DIR (no shards)"),
    ("train_config_dir", "path", [*PRE, "--config", "{dir}"], None, "adjq-train --config DIR"),
    ("train_config_binary", "path", [*PRE, "--config", "{bin}"], None,
     "adjq-train --config BINARY"),
    ("train_config_missing", "path", [*PRE, "--config", "{missing}"], None,
     "adjq-train --config missing.toml"),
    ("train_config_strings", "path", [*PRE, "--config", "{f:strings.toml}"], None,
     "adjq-train --config with lr = \"fast\""),
    ("train_config_syntax", "path", [*PRE, "--config", "{f:syntax.toml}"], None,
     "adjq-train --config invalid TOML"),
    ("train_config_unknown_key", "path", [*PRE, "--config", "{f:unknown_key.toml}"], None,
     "adjq-train --config unknown key"),
    ("train_run_dir_file", "path", [*PRE, "--run_dir", "{file}"], None,
     "adjq-train --run_dir FILE"),
    ("train_run_dir_under_file", "path", [*PRE, "--run_dir", "{file}/sub"], None,
     "adjq-train --run_dir FILE/sub"),
    ("train_run_dir_missing_folders", "path",
     ["--stage", "pretrain", "--run_dir", "{case}/nope/runs/r", *TINY, "--max_epoch", "0.1"],
     creates("{case}/nope/runs/r/pretrain/result.json"),
     "adjq-train --run_dir NEW/FOLDERS/RUN (missing parents are created)"),
    ("train_ckpt_missing", "path", [*PRE, "--ckpt_path", "{missing}"], None,
     "adjq-train pretrain --ckpt_path missing"),
    ("train_ckpt_empty_dir", "path", [*PRE, "--ckpt_path", "{dir}"], None,
     "adjq-train pretrain --ckpt_path DIR without checkpoints"),
    ("train_ckpt_binary", "path", [*PRE, "--ckpt_path", "{bin}"], None,
     "adjq-train pretrain --ckpt_path BINARY"),
    ("train_ckpt_quantized", "path", [*PRE, "--ckpt_path", "{fix}/qat8"], None,
     "adjq-train pretrain --ckpt_path of a qat8 stage"),
    ("train_config_nan", "path", [*PRE, "--config", "{f:nan.toml}"],
     exits_nonzero("lr = nan in a config file must be refused"),
     "adjq-train --config with lr = nan (TOML literal)"),
    ("train_config_inf_epoch", "path",
     ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--config", "{f:inf_epoch.toml}"],
     exits_nonzero("max_epoch = inf in a config file must be refused"),
     "adjq-train --config with max_epoch = inf"),
    ("train_teacher_missing", "path", [*ADJ, "--teacher_ckpt", "{missing}"], None,
     "adjq-train --stage adjustable --teacher_ckpt missing"),
    ("train_teacher_quantized", "path", [*ADJ, "--teacher_ckpt", "{fix}/qat8"], None,
     "adjq-train --stage adjustable --teacher_ckpt QAT8"),
    ("train_calibrate_corrupt_flip", "corrupt",
     ["--stage", "calibrate", "--run_dir", "{run}", *TINY, "--ckpt_path",
      "{corrupt/pretrain/flip_byte/best}"], exits_nonzero("a corrupt checkpoint"),
     "adjq-train --stage calibrate --ckpt_path PRETRAIN (flipped byte in .data)"),
    ("train_teacher_corrupt_trunc_data", "corrupt",
     [*ADJ, "--teacher_ckpt", "{corrupt/pretrain/trunc_data/best}"],
     exits_nonzero("a corrupt checkpoint"),
     "adjq-train --stage adjustable with a truncated .data in the teacher (pretrain)"),
    ("train_resume_clean", "resume", RESUME, exits_zero("a plain resume must work"),
     "adjq-train resumes an interrupted pretrain (same flags)"),
    ("train_resume_lr_allowed", "resume", [*RESUME, "--lr", "1e-2", "--allow_config_change"],
     config_history_written,
     "adjq-train resumes with a different --lr and --allow_config_change"),
    ("guard_lr_nan", "guard", [*ONE_STEP, "--lr=nan", "--lr_fixed"],
     no_nonfinite_checkpoint("{run}/pretrain"),
     "adjq-train --lr nan --lr_fixed, one step per mini-epoch"),
    ("guard_lr_1e30", "guard", [*ONE_STEP, "--lr=1e30", "--lr_fixed"],
     no_nonfinite_checkpoint("{run}/pretrain"),
     "adjq-train --lr 1e30 --lr_fixed, one step per mini-epoch"),
    ("guard_lr_bits_nan", "guard", [*ADJ, "--batch_size", "140", "--max_epoch", "0.3",
                                    "--lr_bits=nan"],
     no_nonfinite_checkpoint("{fix}/adjustable"),
     "adjq-train --stage adjustable --lr_bits nan, one step per mini-epoch"),
    ("guard_lr_decay_neg", "guard",
     ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "1", "--lr_decay=-1"],
     all_of(exits_nonzero("a diverging run (--lr_decay -1) must stop"),
            no_nonfinite_checkpoint("{run}/pretrain")),
     "adjq-train --lr_decay -1 for one epoch (divergence)"),
    ("doc_single_stage", "documented", [*SINGLE, "--ckpt_path", "{fix}/qat8"],
     exits_zero("the command shown in adjq-train --help must work"),
     "adjq-train --stage adjustable --bits_trainable --iter_train --ckpt_path RUN/qat8 "
     "in a new --run_dir"),
    ("doc_single_stage_teacher", "documented",
     [*SINGLE, "--ckpt_path", "{fix}/qat8", "--teacher_ckpt", "{fix}/pretrain"],
     exits_zero("with an explicit teacher"),
     "the single-stage command with --teacher_ckpt RUN/pretrain"),
    ("doc_single_stage_lone", "documented",
     [*SINGLE, "--ckpt_path", "{case}/lone/qat8", "#copy-lone"],
     all_of(exits_nonzero("no teacher can be found"),
            mentions("--teacher_ckpt", "the message does not name --teacher_ckpt")),
     "the single-stage command, --ckpt_path a qat8 copied out of its run (no pretrain)"),
]

# (flag, value, what changes): a resume with it is refused, config.json left as it was.
RESUME_CHANGES = [("width_multiplier", "0.5", "architecture"), ("img_size", "48", "data"),
                  ("lr", "1e-2", "optimisation"), ("seed", "1", "seed"),
                  ("batch_size", "32", "data")]

EVAL = [  # name, arguments (--no-progress is added), expectation
    ("no_args", [], None),
    ("ckpt_missing", ["--ckpt_path", "{missing}"], None),
    ("ckpt_empty_dir", ["--ckpt_path", "{dir}"], None),
    ("ckpt_binary", ["--ckpt_path", "{bin}"], None),
    ("thresholds_dir", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{dir}"], None),
    ("thresholds_binary", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{bin}"], None),
    ("thresholds_strings", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                            "{f:thr_strings.json}"], None),
    ("thresholds_min_gt_max", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                               "{f:thr_min_gt_max.json}"],
     exits_nonzero("thresholds with min > max must be refused")),
    ("thresholds_nan", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{f:thr_nan.json}"],
     exits_nonzero("NaN thresholds")),
    ("thresholds_list", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                         "{f:thr_list.json}"], None),
    ("thresholds_missing", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{missing}"],
     all_of(exits_nonzero("a missing thresholds file"),
            mentions_once("first", "the message repeats itself (issue 28)"))),
    ("thresholds_inf", ["--ckpt_path", "{fix}/pretrain", "--thresholds", "{f:thr_1e39.json}"],
     exits_nonzero("a threshold beyond float32 (1e39) must be refused")),
    ("thresholds_overflow", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                             "{f:thr_overflow.json}"],
     exits_nonzero("a range [-3e38, 3e38] overflows float32's width and must be refused")),
    ("output_missing_folder", ["--ckpt_path", "{fix}/qat8", "--output",
                               "{case}/nope/quant_info.json"],
     all_of(not_after_the_work, creates("{case}/nope/quant_info.json"))),
    ("plot_missing_folder", ["--ckpt_path", "{fix}/qat8", "--plot", "{case}/nope/bits.png"],
     all_of(not_after_the_work, creates("{case}/nope/bits.png"))),
    ("plot_dir", ["--ckpt_path", "{fix}/qat8", "--plot", "{dir}"], None),
    ("float_on_quant", ["--ckpt_path", "{fix}/qat8", "--float"], None),
    ("tflite_missing", ["--tflite", "{missing}.tflite"], None),
    ("tflite_binary", ["--tflite", "{bin}"], None),
    ("batch_size_0", ["--ckpt_path", "{fix}/qat8", "--batch_size", "0"], None),
    ("eval_crop_nan", ["--ckpt_path", "{fix}/qat8", "--eval_crop=nan"],
     exits_nonzero("--eval_crop nan")),
    ("width_inf", ["--ckpt_path", "{fix}/pretrain", "--float", "--width_multiplier=inf"],
     exits_nonzero("--width_multiplier inf")),
    ("good_qat8", ["--ckpt_path", "{fix}/qat8"], exits_zero("a good evaluation")),
    ("good_float_thresholds", ["--ckpt_path", "{fix}/pretrain", "--thresholds",
                               "{fix}/calibrate/initial_thresholds.json"],
     exits_zero("a good evaluation")),
]

EX_FLOAT = ["--ckpt_path", "{fix}/pretrain", "--quantization", "float", "--output",
            "{case}/m.tflite", "--no-progress"]
EXPORT = [  # name, arguments, expectation
    ("seed_neg", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8", "--output",
                  "{case}/m.tflite", "--seed", "-1"],
     exits_nonzero("export --seed -1 must be refused")),
    ("ckpt_missing", ["--ckpt_path", "{missing}", "--quantization", "float"], None),
    ("rep_images_0", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8",
                      "--output", "{case}/m.tflite", "--representative_images", "0"], None),
    ("rep_images_neg", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int8",
                        "--output", "{case}/m.tflite", "--representative_images=-5"], None),
    ("output_missing_folder", ["--ckpt_path", "{fix}/pretrain", "--quantization", "float",
                               "--output", "{case}/nope/m.tflite"],
     creates("{case}/nope/m.tflite")),
    ("output_exists", ["--ckpt_path", "{fix}/pretrain", "--quantization", "float",
                       "--output", "{file}"], None),
    ("no_quantization", ["--ckpt_path", "{fix}/pretrain"], None),
    ("quantization_bogus", ["--ckpt_path", "{fix}/pretrain", "--quantization", "int4"], None),
    ("adjustable_of_float", ["--ckpt_path", "{fix}/pretrain", "--quantization",
                             "adjustable", "--output", "{case}/m.tflite"], None),
    ("saved_model_int8", ["--ckpt_path", "{fix}/pretrain", "--format", "saved_model",
                          "--quantization", "int8", "--output", "{case}/sm"], None),
    ("eval_saved_model", ["--ckpt_path", "{fix}/pretrain", "--format", "saved_model",
                          "--quantization", "float", "--eval", "--output", "{case}/sm"], None),
    ("eval_crop_inf", [*EX_FLOAT, "--eval_crop=inf"], exits_nonzero("--eval_crop inf")),
    ("good_float", EX_FLOAT, exits_zero("a good float export")),
    ("good_adjustable", ["--ckpt_path", "{fix}/qat8", "--quantization", "adjustable",
                         "--output", "{case}/m.tflite"], exits_zero("a good export")),
]

QUANTIZE = [  # name, arguments, expectation
    ("no_args", [], None),
    ("ckpt_missing", ["{missing}", "--algorithm", "bin", "--bits", "8"], None),
    ("ckpt_empty_dir", ["{dir}", "--algorithm", "bin", "--bits", "8"], None),
    ("ckpt_binary", ["{bin}", "--algorithm", "bin", "--bits", "8"], None),
    ("bits_0", [GOOD_CKPT, "--algorithm", "bin", "--bits", "0"], None),
    ("bits_99", [GOOD_CKPT, "--algorithm", "fixed-point", "--bits", "99"], None),
    ("bits_abc", [GOOD_CKPT, "--algorithm", "bin", "--bits", "abc"], None),
    ("algorithm_bogus", [GOOD_CKPT, "--algorithm", "ternary", "--bits", "2"], None),
    ("min_size_neg", [GOOD_CKPT, "--algorithm", "uint8", "--min_size=-1"], None),
    ("min_size_abc", [GOOD_CKPT, "--algorithm", "uint8", "--min_size", "abc"], None),
    ("uint8_bits_4", [GOOD_CKPT, "--algorithm", "uint8", "--bits", "4"], None),
    ("output_is_file", [GOOD_CKPT, "--algorithm", "bin", "--bits", "8", "--output", "{file}"],
     None),
    ("output_missing_folder", [GOOD_CKPT, "--algorithm", "bin", "--bits", "8", "--output",
                               "{case}/nope/q"], creates("{case}/nope/q")),
    ("good_bin8", [GOOD_CKPT, "--algorithm", "bin", "--bits", "8", "--output", "{case}/q"],
     exits_zero("a good quantization")),
    ("good_uint8", [GOOD_CKPT, "--algorithm", "uint8", "--output", "{case}/q"],
     exits_zero("a good quantization")),
]

OLD_QUANTIZER = [  # name, arguments, expectation (python quantizer.py, the seed's form)
    ("bad_network", ["34", GOOD_CKPT, "10", "1", "8"], None),
    ("bad_algorithm", ["50", GOOD_CKPT, "10", "3", "8"], None),
    ("bits_abc", ["50", GOOD_CKPT, "10", "1", "abc"], None),
    ("num_classes_0", ["50", GOOD_CKPT, "0", "1", "8"], None),
    ("missing_args", ["50", GOOD_CKPT], None),
    ("corrupt_flip_byte", ["50", "{corruptp/pretrain/flip_byte/best}", "10", "1", "8"],
     exits_nonzero("a corrupt checkpoint")),
    ("good", ["50", "{fix}/pretrain", "10", "1", "8"], exits_zero("the old form works")),
]

SCORE = [  # name, arguments, expectation
    ("weight_bits_1", ["--weight_bits", "1"], None),
    ("weight_bits_33", ["--weight_bits", "33"], None),
    ("bits_abc", ["--act_bits", "abc"], None),
    ("img_size_0", ["--img_size", "0"], None),
    ("width_nan", ["--width_multiplier", "nan"], exits_nonzero("--width_multiplier nan")),
    ("width_inf", ["--width_multiplier", "inf"], exits_nonzero("--width_multiplier inf")),
    ("depth_1e39", ["--depth_multiplier", "1e39"], None),
    ("num_classes_0", ["--num_classes", "0"], None),
    ("quant_info_missing", ["--quant_info", "{missing}"], None),
    ("quant_info_empty_dir", ["--quant_info", "{dir}"], None),
    ("quant_info_binary", ["--quant_info", "{bin}"], None),
    ("quant_info_strings", ["--quant_info", "{f:quant_info_strings.json}",
                            "--width_multiplier", "0.25", "--depth_multiplier", "0.25",
                            "--num_classes", "10"], None),
    ("json_and_per_layer", ["--json", "--per_layer"], None),
    ("good_default", [], exits_zero("the default score")),
    ("good_stage_dir", ["--quant_info", "{fix}/qat8"], exits_zero("a stage's quant_info")),
]

SWEEP_CASES = [  # name, arguments, expectation
    ("no_args", [], None),
    ("file_missing", ["{missing}.toml"], None),
    ("file_binary", ["{bin}"], None),
    ("file_syntax", ["{f:syntax.toml}"], None),
    ("file_not_a_sweep", ["{f:unknown_key.toml}"], None),
    ("jobs_0", [SWEEP, "--jobs", "0", "--dry_run", "--sweep_dir", "{case}/sweep"], None),
    ("sweep_dir_file", [SWEEP, "--dry_run", "--sweep_dir", "{file}"], None),
    ("good_dry_run", [SWEEP, "--dry_run", "--sweep_dir", "{case}/sweep"],
     exits_zero("the documented dry run")),
]

PARETO = [  # name, arguments, expectation
    ("no_args", [], None),
    ("csv_missing", ["{missing}.csv"], None),
    ("csv_binary", ["{bin}"], None),
    ("csv_text", ["{file}"], None),
    ("csv_empty", ["{f:empty.csv}"], None),
    ("csv_bad_columns", ["{f:bad_columns.csv}"], None),
    ("csv_dir", ["{dir}"], None),
    ("output_missing_folder", ["{repo}/docs/digits_pareto.csv", "--output",
                               "{case}/nope/p.png"], creates("{case}/nope/p.png")),
    ("good", ["{repo}/docs/digits_pareto.csv", "--output", "{case}/p.png"],
     exits_zero("the shipped sweep's plot")),
]

CONVERT = [  # name, arguments, expectation
    ("no_args", [], None),
    ("no_output", ["{bin}"], None),
    ("source_missing", ["{missing}", "--output", "{case}/out"], None),
    ("source_binary", ["{bin}", "--output", "{case}/out"], None),
    ("source_text", ["{file}", "--output", "{case}/out"], None),
    ("source_empty_dir", ["{dir}", "--output", "{case}/out"], None),
    ("model_bogus", ["{bin}", "--model", "bogus", "--output", "{case}/out"], None),
    ("labels_offset_abc", ["{bin}", "--labels_offset", "abc", "--output", "{case}/out"], None),
]

#: Cases the test suite runs: no trained fixture, no training, every command; one case of
#: each command that imports TensorFlow before it fails (seconds each), the others end
#: before TensorFlow is imported.
FAST = (
    "train_lr_inf", "eval_ckpt_missing", "score_weight_bits_1", "export_ckpt_missing",
    "sweep_file_missing", "convert_source_missing",
    "quantize_no_args", "quantize_ckpt_missing", "quantize_ckpt_empty_dir",
    "quantize_ckpt_binary",
    "pareto_no_args", "pareto_csv_missing", "pareto_csv_binary", "pareto_csv_text",
    "pareto_csv_empty", "pareto_csv_bad_columns", "pareto_csv_dir",
    "convert_no_args",
)


def _table(prefix, category, command, rows, extra=()) -> list[Case]:
    return [Case(f"{prefix}_{name}", category, command, [*args, *extra], expect)
            for name, args, expect in rows]


def _corruption_cases() -> list[Case]:
    out = []
    for kind in CORRUPTIONS:
        out += [
            Case(f"train_resume_corrupt_{kind}", "corrupt", "adjq-train",
                 [*RESUME, "#{corrupt/partial/" + kind + "/latest}"],
                 exits_zero("resume must fall back to the previous intact checkpoint and "
                            "continue"),
                 f"adjq-train resumes an interrupted pretrain whose latest checkpoint has {kind}"),
            Case(f"eval_corrupt_{kind}", "corrupt", "adjq-eval",
                 ["--ckpt_path", "{corrupt/qat8/" + kind + "/best}", "--no-progress"],
                 exits_nonzero("a corrupt checkpoint"),
                 f"adjq-eval --ckpt_path QAT8 with {kind}"),
            Case(f"export_corrupt_{kind}", "corrupt", "adjq-export",
                 ["--ckpt_path", "{corrupt/pretrain/" + kind + "/best}", "--quantization",
                  "float", "--output", "{case}/m.tflite"],
                 exits_nonzero("a corrupt checkpoint"),
                 f"adjq-export --ckpt_path PRETRAIN with {kind}"),
            Case(f"quantize_corrupt_{kind}", "corrupt", "adjq-quantize-checkpoint",
                 ["{corruptp/pretrain/" + kind + "/best}", "--algorithm", "bin", "--bits", "8",
                  "--output", "{case}/q"], exits_nonzero("a corrupt checkpoint"),
                 f"adjq-quantize-checkpoint PRETRAIN_PREFIX with {kind}"),
        ]
    return out


def _process_cases() -> list[Case]:
    """Resumes with changed flags, a second process on a running stage, a full disk."""
    out = [Case(f"train_resume_{flag}", "resume", "adjq-train", [*RESUME, f"--{flag}", value],
                refused_unchanged, f"adjq-train resumes with a different --{flag} ({kind} change)",
                setup=snapshot_partial) for flag, value, kind in RESUME_CHANGES]
    out.append(Case("train_concurrent_same_stage", "lock", "adjq-train",
                    ["--stage", "pretrain", "--run_dir", "{run}", *TINY, "--max_epoch", "3"],
                    exits_nonzero("a second process on the same stage must be refused (lock)"),
                    "a second adjq-train on the stage a running adjq-train is training",
                    runner="concurrent"))
    out.append(Case("train_disk_full", "disk", "adjq-train",
                    ["--stage", "pretrain", "--run_dir", "{case}/tmpfs/run", *TINY,
                     "--max_epoch", "0.3"], no_orphans,
                    "adjq-train on a 3 MiB tmpfs (No space left on device at the second "
                    "checkpoint)", runner="disk_full"))
    return out


def all_cases() -> list[Case]:
    cases = [*_float_flag_cases(), *_int_flag_cases(),
             *[Case(name, category, "adjq-train", args, expect, desc)
               for name, category, args, expect, desc in TRAIN],
             *_process_cases(), *_corruption_cases(),
             *_table("eval", "eval", "adjq-eval", EVAL, extra=["--no-progress"]),
             *_table("export", "export", "adjq-export", EXPORT),
             *_table("quantize", "quantize", "adjq-quantize-checkpoint", QUANTIZE),
             *_table("oldquantizer", "quantize", "quantizer.py", OLD_QUANTIZER),
             *_table("score", "score", "adjq-score", SCORE),
             *_table("sweep", "sweep", "adjq-sweep", SWEEP_CASES),
             *_table("pareto", "pareto", "adjq-pareto", PARETO),
             *_table("convert", "convert", "adjq-convert", CONVERT)]
    for c in cases:
        if c.name == "oldquantizer_corrupt_flip_byte":
            c.category = "corrupt"
    names = [c.name for c in cases]
    dupes = {n for n in names if names.count(n) > 1}
    assert not dupes, dupes
    return cases


def fast_cases() -> list[Case]:
    by_name = {c.name: c for c in all_cases()}
    return [by_name[name] for name in FAST]

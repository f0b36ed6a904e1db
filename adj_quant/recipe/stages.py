"""The five stages of the recipe (docs/method.md, "The recipe"), each in ``<run_dir>/<stage>/``.

1. ``pretrain``   float EfficientNet-B0 with batch norm, cross-entropy;
2. ``calibrate``  initial thresholds of the BN-folded float model (``initial_thresholds.json``);
3. ``qat8``       fixed 8-bit quantization-aware training, ranges learned, KD from the float model;
4. ``adjustable`` trainable bits and ranges, the metric term (``--bits_trainable --iter_train``);
5. ``finetune``   bits frozen (``--finetune``) with SWA, from the best checkpoint near the target.

Each stage reads the previous stage's output from the run directory unless ``--ckpt_path``
says otherwise. A finished stage is not run again; an interrupted one resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time

from adj_quant import distribution, nets
from adj_quant.checkpoints import (
    ModelSpec,
    RunCheckpoints,
    load_spec,
    model_spec_for,
    read_json,
    remove_orphans,
    resolve_checkpoint,
    restore_model,
    save_spec,
    write_json_atomic,
)
from adj_quant.directory_lock import DirectoryLock
from adj_quant.errors import UserError
from adj_quant.network import Network
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
from adj_quant.quant_info import save_quant_info
from adj_quant.recipe import data as data_lib
from adj_quant.recipe import validation
from adj_quant.recipe.config import (
    STAGES,
    Options,
    check_config_change,
    record_config,
    resolve,
)
from adj_quant.recipe.data import data_args, num_classes, validation_data
from adj_quant.recipe.trainer import Trainer

THRESHOLDS = "initial_thresholds.json"
RESULT = "result.json"


def default_run_dir(o: Options) -> str:
    name = o.dataset if o.dataset in data_lib.DATASET_NAMES else os.path.basename(
        os.path.normpath(o.dataset))
    return os.path.join("runs", name)


def arch_of(o: Options) -> Network:
    """The network the options ask for: ``--model`` (a declared name, with the multipliers
    and the dataset's class count, or ``keras:PATH``, imported)."""
    if o.model.startswith("keras:"):
        net = keras_model(o.model)[0]
        if net.num_classes != num_classes(o):
            raise UserError(f"--model {o.model} has {net.num_classes} outputs but the dataset "
                            f"has {num_classes(o)} classes; save the Keras model with "
                            f"{num_classes(o)} classes or pass --num_classes")
        return net
    return nets.build(o.model, num_classes=num_classes(o),
                      width_multiplier=o.width_multiplier, depth_multiplier=o.depth_multiplier)


@functools.lru_cache(maxsize=2)
def keras_model(model: str) -> tuple[Network, dict]:
    """``(declaration, weights)`` of ``keras:PATH`` (imported once per process)."""
    import keras

    path = model[len("keras:"):]
    try:
        loaded = keras.saving.load_model(path, compile=False)
    except Exception as err:  # noqa: BLE001 (Keras raises many kinds for a bad file)
        raise UserError(f"--model {model}: Keras cannot load {path} "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None
    name = os.path.splitext(os.path.basename(path))[0]
    return nets.from_keras(loaded, name=name)


def quant_config(o: Options, bits_trainable: bool | None = None) -> QuantConfig:
    """The quantizer setup the options name; ``bits_trainable`` None: ``--bits_trainable``."""
    if bits_trainable is None:
        return QuantConfig.from_options(o)
    return QuantConfig.from_options(o, bits_trainable=bits_trainable)


def calibrate_activations(qmodel: QuantizedNetwork, o: Options) -> int:
    """Running per-channel activation ranges over ``--calib_images`` training images."""
    name, dataset_dir, classes, offset = data_args(o)
    batches = data_lib.make_dataset(name, "train", batch_size=100, img_size=o.img_size,
                                    training=False, dataset_dir=dataset_dir,
                                    labels_offset=offset, num_classes=classes,
                                    eval_crop=o.eval_crop)
    return qmodel.calibrate_activations(data_lib.iterate(batches, "calibration data"),
                                        o.calib_images, progress=o.progress)


def near_target_key(target: float):
    """Rank checkpoints: those at or below the target first, by top-1; then by lowest metric."""
    def key(entry):
        meets = entry["metric"] <= target
        return (meets, entry["top1"] if meets else -entry["metric"])
    return key


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of the recipe, as data (:data:`RECIPE`)."""

    name: str
    #: ``float`` (pretrain), ``calibrate`` or ``quantized`` (trained quantized stages).
    kind: str
    #: The earlier stage whose best checkpoint it starts from (unless ``--ckpt_path``).
    init_from: str | None = None
    #: Where the activation thresholds come from: ``calibrate`` (the calibrate stage's
    #: ``initial_thresholds.json``, applied to the float ``init_from`` model) or
    #: ``checkpoint`` (the quantized ``init_from`` checkpoint holds them).
    thresholds: str | None = None
    #: Whether bits train: False, or None for ``--bits_trainable``.
    bits_trainable: bool | None = None
    #: How the best checkpoint is chosen: ``top1`` or ``near_target`` (at or below
    #: ``--metric`` first, by top-1; then the lowest metric).
    best: str = "top1"
    #: Forces ``--finetune`` (bits frozen) and keeps the quantizer setup (the learned bits)
    #: of a quantized start checkpoint.
    finetune: bool = False

    def best_key(self, o: Options):
        return near_target_key(o.metric) if self.best == "near_target" else None


RECIPE = (
    StageSpec("pretrain", "float"),
    StageSpec("calibrate", "calibrate", init_from="pretrain", bits_trainable=False),
    StageSpec("qat8", "quantized", init_from="pretrain", thresholds="calibrate",
              bits_trainable=False),
    StageSpec("adjustable", "quantized", init_from="qat8", thresholds="checkpoint",
              best="near_target"),
    StageSpec("finetune", "quantized", init_from="adjustable", thresholds="checkpoint",
              finetune=True),
)
SPECS = {spec.name: spec for spec in RECIPE}
assert tuple(SPECS) == STAGES


class Stage:
    """Shared plumbing of one stage run: its options (resolved once), directory and
    strategy."""

    def __init__(self, name: str, cli: dict):
        self.name = name
        self.spec = SPECS[name]
        self.o = resolve(cli, name)
        if self.spec.finetune:
            self.o = dataclasses.replace(self.o, finetune=True)
        self.run_dir = self.o.run_dir or default_run_dir(self.o)
        self.dir = os.path.join(self.run_dir, name)
        for path in (self.run_dir, self.dir):
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"--run_dir: {path} is a file, not a directory; pass a "
                                "directory for the run's stages")
        self.strategy = None
        self.chief = True
        # The strategy first: logical devices and collective ops must be set up before
        # anything starts TensorFlow's runtime (loading a keras:PATH model does).
        self.distribute()
        self.arch = arch_of(self.o)  # checks the dataset before anything else happens
        self.config_changes: dict = {}

    def distribute(self) -> "Stage":
        """Pick the ``--strategy`` (created once per process) this stage runs under."""
        o = self.o
        self.strategy = distribution.get_strategy(o.strategy, logical_cpus=o.logical_cpus,
                                                  worker_timeout=o.worker_timeout)
        self.chief = distribution.is_chief(self.strategy)
        replicas = self.strategy.num_replicas_in_sync
        if o.batch_size < replicas:
            raise UserError(f"--batch_size {o.batch_size} is the global batch and smaller than "
                            f"the {replicas} replicas of --strategy {o.strategy}; pass at least "
                            f"{replicas}")
        return self

    def check_resume(self) -> None:
        """Called holding the stage's lock, before anything is written: clean up what an
        interrupted save left, and refuse a resume with another model or data."""
        remove_orphans(self.dir)
        resuming = os.path.exists(os.path.join(self.dir, "checkpoints.json")) and bool(
            RunCheckpoints(self.dir).entries())
        self.config_changes = check_config_change(self.o, self.dir, resuming)

    def build(self, spec: ModelSpec):
        return spec.build(seed=self.o.seed, dropout_rate=self.o.dropout,
                          drop_connect_rate=self.o.drop_connect,
                          bn_momentum=self.o.bn_momentum, sync_bn=self.o.sync_bn)

    def previous(self, stage: str) -> str:
        """Best checkpoint of an earlier stage of this run."""
        directory = os.path.join(self.run_dir, stage)
        if not os.path.isdir(directory):
            raise UserError(f"[{self.name}] needs the output of stage {stage!r} in {directory}; "
                            f"run `train.py --stage {stage} --run_dir {self.run_dir}` first or "
                            "pass --ckpt_path")
        return resolve_checkpoint(directory, f"stage {stage} output")

    def float_spec(self, path: str, what: str) -> ModelSpec:
        spec = model_spec_for(path, ModelSpec("float", self.arch), what)
        if spec.kind != "float":
            raise UserError(f"{what} {path} holds a quantized model; pass a float checkpoint")
        self._check_arch(spec, path, what)
        return spec

    def load_float(self, path: str, what: str):
        model = self.build(self.float_spec(path, what))
        restore_model(model, path, what, allow_missing=())
        return model

    def source_run_stage(self, stage: str) -> str | None:
        """``stage``'s directory in the run that ``--ckpt_path`` comes from, when that is
        another run than this one and it has the stage."""
        if not self.o.ckpt_path:
            return None
        prefix = resolve_checkpoint(self.o.ckpt_path, "--ckpt_path")
        stage_dir = os.path.dirname(os.path.abspath(prefix))
        if os.path.basename(stage_dir) not in STAGES:
            return None
        candidate = os.path.join(os.path.dirname(stage_dir), stage)
        own = os.path.abspath(os.path.join(self.run_dir, stage))
        return candidate if os.path.isdir(candidate) and candidate != own else None

    def teacher(self):
        """The float teacher: ``--teacher_ckpt``, else this run's pretrain stage, else the
        pretrain stage of the run ``--ckpt_path`` comes from."""
        if self.o.teacher_ckpt:
            path = resolve_checkpoint(self.o.teacher_ckpt, "--teacher_ckpt")
        elif os.path.isdir(os.path.join(self.run_dir, "pretrain")):
            path = self.previous("pretrain")
        elif (other := self.source_run_stage("pretrain")) is not None:
            path = resolve_checkpoint(other, "teacher")
            print(f"[{self.name}] distilling from {path}, the float model of --ckpt_path's run "
                  "(--teacher_ckpt picks another)", file=sys.stderr)
        else:
            raise UserError(f"[{self.name}] needs a float teacher for distillation and "
                            f"{os.path.join(self.run_dir, 'pretrain')} does not exist; pass "
                            "--teacher_ckpt PRETRAIN_CHECKPOINT")
        return self.load_float(path, "--teacher_ckpt")

    def _check_arch(self, spec: ModelSpec, path: str, what: str) -> None:
        want = self.arch
        if spec.arch != want:
            def describe(net):
                params = dict(net.params)
                extra = ", ".join(f"{k} {v}" for k, v in params.items() if k != "num_classes")
                return f"{net.name} with {params.get('num_classes')} classes ({extra})"
            raise UserError(f"{what} {path} is a model {describe(spec.arch)} but this run "
                            f"needs {describe(want)}")

    def quantized_from(self, path: str, what: str, qcfg: QuantConfig, thresholds: str | None):
        """A quantized model initialised from a float or quantized checkpoint."""
        spec = model_spec_for(path, None if thresholds is None else
                              ModelSpec("float", self.arch), what)
        self._check_arch(spec, path, what)
        if spec.kind == "quant" and spec.quant.quantizer != qcfg.quantizer:
            raise UserError(f"{what} {path} holds a model trained with --quantizer "
                            f"{spec.quant.quantizer}; pass --quantizer {spec.quant.quantizer}, or "
                            f"start --quantizer {qcfg.quantizer} from a float checkpoint")
        if spec.kind == "float":
            float_model = self.load_float(path, what)
            model = QuantizedNetwork.from_float(
                float_model, qcfg, seed=self.o.seed, dropout_rate=self.o.dropout,
                drop_connect_rate=self.o.drop_connect)
            model.load_thresholds(thresholds or self.thresholds_path())
            return model
        model = self.build(ModelSpec("quant", spec.arch, qcfg))
        restore_model(model, path, what)
        return model

    def thresholds_path(self) -> str:
        """This run's calibrated thresholds, else those of ``--ckpt_path``'s run."""
        own = os.path.join(self.run_dir, "calibrate", THRESHOLDS)
        other = self.source_run_stage("calibrate")
        if not os.path.exists(own) and other and os.path.exists(os.path.join(other, THRESHOLDS)):
            return os.path.join(other, THRESHOLDS)
        return own

    def already_finished(self) -> dict | None:
        result = os.path.join(self.dir, RESULT)
        if os.path.exists(result):
            print(f"[{self.name}] already finished in {self.dir}; delete it or use another "
                  "--run_dir to run it again")
            return read_json(result)
        return None

    def start(self, spec: ModelSpec | None) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if not self.chief:
            return
        record_config(self.o, self.dir, self.config_changes)
        if spec is not None:
            save_spec(self.dir, spec)

    def finish(self, result: dict) -> dict:
        """The chief writes ``result.json``; every worker waits for it and returns it."""
        path = os.path.join(self.dir, RESULT)
        if self.chief:
            write_json_atomic(path, result)
        if self.strategy is not None:
            distribution.barrier(self.strategy)
        return result if self.chief else read_json(path)

    def train(self, model, teacher=None, best_key=None) -> dict:
        trainer = Trainer(model, self.o, self.dir, teacher=teacher, best_key=best_key,
                          stage=self.name)
        trainer.restore_if_resuming()
        outcome = trainer.run()
        return {"best_checkpoint": outcome.best_path, **outcome.best}


# --------------------------------------------------------------------------- stages


def run_stage(name: str, body, cli: dict) -> dict:
    """Run ``body(stage)`` under the ``--strategy``, the chief holding the stage
    directory's lock; a finished stage is skipped."""
    return _run_stage(name, body, cli)[1]


def _run_stage(name: str, body, cli: dict) -> tuple[Stage, dict]:
    st = Stage(name, cli)
    if (done := st.already_finished()) is not None:
        return st, done
    started = time.perf_counter()
    result = _run_stage_body(st, name, body)
    if st.chief:
        print(f"[{name}] stage time {time.perf_counter() - started:,.0f} s")
    return result


def _run_stage_body(st, name: str, body) -> tuple[Stage, dict]:
    st.distribute()
    if not st.chief:  # the chief locks, cleans and writes; the others follow it
        with st.strategy.scope():
            return st, body(st)
    created = not os.path.exists(st.dir)
    try:
        with DirectoryLock(st.dir, f"[{name}] stage directory"), st.strategy.scope():
            if (done := st.already_finished()) is not None:  # finished while we waited
                return st, done
            st.check_resume()
            return st, body(st)
    finally:
        if created and os.path.isdir(st.dir) and not os.listdir(st.dir):
            os.rmdir(st.dir)  # refused before writing anything: leave no trace


def _pretrain(st: Stage) -> dict:
    arch = st.arch
    model = st.build(ModelSpec("float", arch))
    if st.o.ckpt_path:
        path = resolve_checkpoint(st.o.ckpt_path, "--ckpt_path")
        st.float_spec(path, "--ckpt_path")
        restore_model(model, path, allow_missing=())
    elif st.o.model.startswith("keras:"):  # start from the Keras model's own weights
        from adj_quant.keras_import import load_weights

        load_weights(model, keras_model(st.o.model)[1])
        print(f"[pretrain] starting from the weights of {st.o.model[len('keras:'):]}",
              file=sys.stderr)
    st.start(ModelSpec("float", arch))
    return st.finish(st.train(model))


def _start_checkpoint(st: Stage) -> str:
    """``--ckpt_path``, else the best checkpoint of the stage's ``init_from``."""
    if st.o.ckpt_path:
        return resolve_checkpoint(st.o.ckpt_path, "--ckpt_path")
    return st.previous(st.spec.init_from)


def _calibrate(st: Stage) -> dict:
    o = st.o
    path = _start_checkpoint(st)
    float_model = st.load_float(path, "--ckpt_path")
    qmodel = QuantizedNetwork.from_float(float_model, quant_config(o, st.spec.bits_trainable),
                                         seed=o.seed)
    data_lib.dataset_info(*data_args(o))  # bad data is reported before anything is written
    st.start(None)
    seen = calibrate_activations(qmodel, o)
    if st.chief:
        qmodel.save_thresholds(os.path.join(st.dir, THRESHOLDS))
    val = validation_data(o, float_model.arch.num_classes)
    result = {"float_checkpoint": path, "calibration_images": seen,
              "float_top1": validation.accuracy(float_model, val, progress=o.progress,
                                                max_images=o.max_val_images)["top1"]}
    if o.eval_initial_thresholds:
        result["initial_thresholds_top1"] = validation.accuracy(
            qmodel, val, progress=o.progress, max_images=o.max_val_images)["top1"]
    print(f"[calibrate] {seen} images -> {os.path.join(st.dir, THRESHOLDS)}; float top-1 "
          f"{100 * result['float_top1']:.2f}%" + (
              f", {o.weight_bits}/{o.act_bits}-bit with initial thresholds "
              f"{100 * result['initial_thresholds_top1']:.2f}%"
              if "initial_thresholds_top1" in result else ""))
    return st.finish(result)


def _quantized_stage(st: Stage) -> dict:
    """qat8, adjustable and finetune: a quantized model from the start checkpoint,
    distilled from the float teacher, as the stage's :class:`StageSpec` says."""
    spec, o = st.spec, st.o
    teacher = st.teacher()
    init = _start_checkpoint(st)
    qcfg = quant_config(o, spec.bits_trainable)
    source = load_spec(init)
    if spec.finetune and source is not None and source.kind == "quant":
        # keep the learned bits: the quantizer setup of the source run, its masks frozen
        qcfg = dataclasses.replace(source.quant, learned_sparsity=False)
    elif source is not None and source.kind == "quant" and source.quant.pruned and \
            not qcfg.pruned:
        qcfg = dataclasses.replace(qcfg, pruned=True)  # its masks stay (no further pruning)
    thresholds = st.thresholds_path() if spec.thresholds == "calibrate" or o.ckpt_path else None
    model = st.quantized_from(init, "--ckpt_path", qcfg, thresholds)
    st.start(ModelSpec("quant", model.arch, qcfg))
    result = st.train(model, teacher, spec.best_key(o))
    return st.finish(result)


BODIES = {"float": _pretrain, "calibrate": _calibrate, "quantized": _quantized_stage}


def pretrain(cli: dict) -> dict:
    """Train the float model, or, with ``--pretrained SOURCE``, convert published weights
    into the stage directory instead (then the recipe goes on at calibrate)."""
    if cli.get("pretrained"):
        return _convert_pretrained(cli)
    return run_stage("pretrain", BODIES[SPECS["pretrain"].kind], cli)


def adopt_pretrained_model(cli: dict) -> None:
    """With ``--pretrained`` and no ``--model``, the run's network is the source's (every
    stage reads ``cli``, so this is set once, before the first stage)."""
    if cli.get("pretrained") and not cli.get("model"):
        from pretrained.convert import describe

        cli["model"] = describe(cli["pretrained"])["model"]


def _convert_pretrained(cli: dict) -> dict:
    from pretrained.convert import convert, describe

    adopt_pretrained_model(cli)
    st = Stage("pretrain", cli)
    if (done := st.already_finished()) is not None:
        return done
    distribution.barrier(st.distribute().strategy)  # every worker checks before anyone writes
    if os.path.exists(st.dir):
        raise UserError(f"--pretrained: {st.dir} exists but holds no finished pretrain stage; "
                        "delete it or use another --run_dir")
    source = describe(st.o.pretrained)
    # A 1001-class slim checkpoint for a 1000-class dataset: drop the background logit.
    offset = 1 if source["source_num_classes"] == num_classes(st.o) + 1 else 0
    if source["source_num_classes"] - offset != num_classes(st.o):
        raise UserError(f"--pretrained {st.o.pretrained} has {source['source_num_classes']} "
                        f"classes but the dataset has {num_classes(st.o)}; pass a checkpoint "
                        "with the dataset's classes")
    distribution.barrier(st.strategy)
    if not st.chief:  # the chief converts; the others wait for its result
        distribution.barrier(st.strategy)
        return read_json(os.path.join(st.dir, RESULT))
    convert(st.o.pretrained, st.o.model, st.dir, labels_offset=offset,
            stage_files=converted_pretrain_files)
    print(f"[pretrain] converted {st.o.pretrained} ({source['description']}) into {st.dir}; "
          "no float training", file=sys.stderr)
    distribution.barrier(st.strategy)
    return read_json(os.path.join(st.dir, RESULT))


def converted_pretrain_files(directory: str, final_dir: str, net: Network, info: dict) -> None:
    """The files that make converted weights in ``directory`` (to become ``final_dir``) a
    finished ``pretrain`` stage: ``config.json``, what eval.py and export take as defaults
    for the checkpoint (flags override them), and ``result.json``."""
    from pretrained.convert import CHECKPOINT_NAME, PUBLISHED_IMG_SIZE

    write_json_atomic(os.path.join(directory, "config.json"), {
        "model": net.name, "num_classes": net.num_classes, "img_size": PUBLISHED_IMG_SIZE,
        "width_multiplier": 1.0, "depth_multiplier": 1.0}, sort_keys=True)
    write_json_atomic(os.path.join(directory, RESULT), {
        "best_checkpoint": os.path.join(final_dir, CHECKPOINT_NAME), **info})


def _stage_function(spec: StageSpec):
    def run(cli: dict) -> dict:
        return run_stage(spec.name, BODIES[spec.kind], cli)

    run.__name__ = run.__qualname__ = spec.name
    run.__doc__ = f"Run the {spec.name} stage (:data:`RECIPE`) with the options ``cli``."
    return run


STAGE_FUNCTIONS = {spec.name: pretrain if spec.name == "pretrain" else _stage_function(spec)
                   for spec in RECIPE}
calibrate, qat8 = STAGE_FUNCTIONS["calibrate"], STAGE_FUNCTIONS["qat8"]
adjustable, finetune = STAGE_FUNCTIONS["adjustable"], STAGE_FUNCTIONS["finetune"]
assert tuple(STAGE_FUNCTIONS) == STAGES


def write_final_quant_info(st: Stage, finetune_result: dict) -> str:
    """``quant_info.json`` of the final model, beside its checkpoint (written by the
    chief of the finetune stage ``st``)."""
    path = finetune_result["best_checkpoint"]
    out = os.path.join(os.path.dirname(path), "quant_info.json")
    if not st.chief:
        return out
    spec = model_spec_for(path, None, "final checkpoint")
    model = st.build(spec)
    restore_model(model, path, "final checkpoint")
    summary = {k: finetune_result.get(k) for k in (
        "avg_weight_bits", "avg_act_bits", "params", "ops", "score_adjq", "score_micronet",
        "top1", "top5")}
    save_quant_info(out, model.bit_assignment(), model.arch, summary)
    return out


def run_recipe(cli: dict) -> dict:
    adopt_pretrained_model(cli)
    results = {spec.name: STAGE_FUNCTIONS[spec.name](cli) for spec in RECIPE[:-1]}
    last = RECIPE[-1]
    st, results[last.name] = _run_stage(last.name, BODIES[last.kind], cli)
    results["quant_info"] = write_final_quant_info(st, results[last.name])
    return results


def summary_table(results: dict) -> str:
    fin = results["finetune"]
    rows = [
        ("float top-1", f"{100 * results['calibrate']['float_top1']:.2f}%"),
        ("8-bit top-1 (qat8)", f"{100 * results['qat8']['top1']:.2f}%"),
        ("adjustable top-1 (finetune+SWA)", f"{100 * fin['top1']:.2f}%"),
        ("avg weight bits", f"{fin['avg_weight_bits']:.2f}"),
        ("avg activation bits", f"{fin['avg_act_bits']:.2f}"),
        ("score_micronet (official)", f"{fin['score_micronet']:.4f}"),
        ("score_adjq (submission's counting)", f"{fin['score_adjq']:.4f}"),
    ]
    width = max(len(r[0]) for r in rows)
    lines = ["", "Adjustable Quantization summary", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {value:>9}" for name, value in rows]
    return "\n".join(lines)

"""The recipe as data: the stage table says what each stage starts from and how."""

import pytest

from adj_quant.recipe import stages
from adj_quant.recipe.config import STAGES, resolve


def test_recipe_table_is_the_documented_recipe():
    spec = stages.SPECS
    assert tuple(s.name for s in stages.RECIPE) == STAGES == tuple(stages.STAGE_FUNCTIONS)
    assert (spec["pretrain"].kind, spec["calibrate"].kind) == ("float", "calibrate")
    # qat8: the pretrain checkpoint plus the calibrate thresholds, fixed bits.
    assert (spec["qat8"].init_from, spec["qat8"].thresholds) == ("pretrain", "calibrate")
    assert spec["qat8"].bits_trainable is False and spec["calibrate"].bits_trainable is False
    # adjustable and finetune: the previous quantized checkpoint, --bits_trainable as given.
    assert (spec["adjustable"].init_from, spec["adjustable"].thresholds) == ("qat8",
                                                                             "checkpoint")
    assert (spec["finetune"].init_from, spec["finetune"].thresholds) == ("adjustable",
                                                                         "checkpoint")
    assert spec["adjustable"].bits_trainable is None and spec["finetune"].bits_trainable is None
    assert [s.name for s in stages.RECIPE if s.finetune] == ["finetune"]
    assert [s.name for s in stages.RECIPE if s.best == "near_target"] == ["adjustable"]


def test_best_checkpoint_rule_of_each_stage():
    o = resolve({"dataset": "synthetic", "metric": 0.2}, "adjustable")
    assert stages.SPECS["qat8"].best_key(o) is None  # the trainer's default: top-1
    key = stages.SPECS["adjustable"].best_key(o)
    entries = [{"metric": 0.3, "top1": 0.9}, {"metric": 0.25, "top1": 0.1},
               {"metric": 0.2, "top1": 0.5}, {"metric": 0.1, "top1": 0.6}]
    # At or below the target first, by top-1 (0.6 before 0.5); then the lowest metric.
    assert max(entries, key=key) == {"metric": 0.1, "top1": 0.6}
    ranked = sorted(entries, key=key, reverse=True)
    assert [e["metric"] for e in ranked] == [0.1, 0.2, 0.25, 0.3]


@pytest.mark.parametrize("bits_trainable", [None, True, False])
def test_quant_config_of_a_stage(bits_trainable):
    o = resolve({"dataset": "synthetic", "bits_trainable": True, "swish_bits": 0}, "adjustable")
    qcfg = stages.quant_config(o, bits_trainable)
    assert qcfg.bits_trainable is (True if bits_trainable is None else bits_trainable)
    assert qcfg.swish_bits == 0 and qcfg.range_preset == o.range


def test_finetune_forces_finetune_and_resolves_its_options_once(tmp_path):
    cli = {"dataset": "synthetic", "img_size": 32, "run_dir": str(tmp_path)}
    st = stages.Stage("finetune", cli)
    assert st.o.finetune is True and st.spec is stages.SPECS["finetune"]
    assert stages.Stage("adjustable", cli).o.finetune is False
    assert st.chief  # one process: the chief

"""A run trained with unrolled layers resumes in their layout when the
config asks for scanned ones (the layouts themselves:
tests/unit/test_scan.py)."""

import pytest

from bitnet_jax.runs import checkpoint
from bitnet_jax.training import loop


@pytest.mark.slow
def test_a_resume_takes_the_layout_of_its_checkpoints(tiny_config, tmp_path,
                                                      caplog):
  workdir = str(tmp_path / "run")
  tiny_config.model.scan_layers = False
  tiny_config.optimizer.warmup_steps = 1
  tiny_config.train.steps = 4
  tiny_config.train.eval_batches = 1
  tiny_config.train.eval_every = tiny_config.train.checkpoint_every = 4
  loop.train_and_evaluate(tiny_config, workdir)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.model.scan_layers = True
  resumed.train.steps = 6
  with caplog.at_level("WARNING"):
    final = loop.train_and_evaluate(resumed, workdir)
  assert final["loss"] > 0, final
  assert any("hold unrolled layers: resuming in their layout" in r.getMessage()
             for r in caplog.records), "no WARNING about the layout"
  checkpointer = checkpoint.Checkpointer(f"{workdir}/checkpoints", keep=3)
  try:
    assert checkpointer.latest_step() == 6
    assert checkpointer.saved_scan_layers() is False, (
        "the resumed run did not keep the unrolled layout")
  finally:
    checkpointer.close()

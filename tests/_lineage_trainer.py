"""TEST-ONLY: the Trainer `run_fn` of tests/lineage/test_lineage.py's trained pipeline.

Imported by TFX's GenericExecutor by its dotted path (`run_fn=...`), so no
module wheel is built. It "trains" nothing: it exports the demo pipeline's
tiny SavedModel to the Trainer's serving directory, so the MLMD events are
those of a real Trainer execution (Examples in, Model out) at a test's cost.
"""

import os


def run_fn(fn_args):
  # pylint: disable=g-import-not-at-top
  from pipelines import local_pipeline
  # pylint: enable=g-import-not-at-top
  assert fn_args.train_files, 'the Trainer got no Examples'
  local_pipeline.write_tiny_model(fn_args.serving_model_dir)
  assert os.path.exists(os.path.join(fn_args.serving_model_dir,
                                     'saved_model.pb'))

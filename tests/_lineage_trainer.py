"""TEST-ONLY: the Trainer `run_fn` of tests/lineage/test_lineage.py's trained pipeline.

Imported by TFX's GenericExecutor by its dotted path (`run_fn=...`), so no
module wheel is built. It genuinely trains a tiny Keras model (logistic
regression on `x1, x2, x3` -> `y`) on the Trainer's Examples and exports it
with a `serving_default` signature over serialized tf.Examples, the form
TFX's own templates use, so the Evaluator (TFMA) can evaluate it and bless
it. A few hundred milliseconds of training on a few dozen rows.

`write_csv(directory)` writes the synthetic data the pipeline reads
(CsvExampleGen's `input_base`): `y` is 1 exactly when `x3 > 15`.
`eval_config()` is the Evaluator's: binary accuracy at least 0.7.
"""

import os

FEATURES = ('x1', 'x2', 'x3')
LABEL = 'y'
ROWS = 60


def write_csv(directory: str, rows: int = ROWS) -> str:
  """The pipeline's input data: one CSV file in `directory`."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, 'data.csv')
  with open(path, 'w') as f:
    f.write('x1,x2,x3,y\n' + ''.join(
        f'{i},{i % 3},{i * 0.5},{int(i * 0.5 > 15)}\n' for i in range(rows)))
  return path


def eval_config():
  """TFMA config: label `y`, binary accuracy, blessed at >= 0.7."""
  import tensorflow_model_analysis as tfma  # pylint: disable=g-import-not-at-top
  return tfma.EvalConfig(
      model_specs=[tfma.ModelSpec(label_key=LABEL)],
      slicing_specs=[tfma.SlicingSpec()],
      metrics_specs=[tfma.MetricsSpec(metrics=[
          tfma.MetricConfig(
              class_name='BinaryAccuracy',
              threshold=tfma.MetricThreshold(
                  value_threshold=tfma.GenericValueThreshold(
                      lower_bound={'value': 0.7}))),
          tfma.MetricConfig(class_name='ExampleCount'),
      ])])


def _feature_spec(tf, with_label: bool):
  spec = {'x1': tf.io.FixedLenFeature([1], tf.int64),
          'x2': tf.io.FixedLenFeature([1], tf.int64),
          'x3': tf.io.FixedLenFeature([1], tf.float32)}
  if with_label:
    spec[LABEL] = tf.io.FixedLenFeature([1], tf.int64)
  return spec


def _as_float(tf, features):
  return {k: tf.cast(features[k], tf.float32) for k in FEATURES}


def _dataset(tf, file_patterns, batch_size=16):
  files = sorted(f for p in file_patterns for f in tf.io.gfile.glob(p))
  assert files, f'no Examples under {file_patterns}'
  spec = _feature_spec(tf, with_label=True)
  ds = tf.data.TFRecordDataset(files, compression_type='GZIP')
  ds = ds.batch(batch_size).map(lambda s: tf.io.parse_example(s, spec))
  return ds.map(lambda f: (_as_float(tf, f), tf.cast(f[LABEL], tf.float32)))


def build_model(tf):
  inputs = {k: tf.keras.Input(shape=(1,), name=k, dtype=tf.float32)
            for k in FEATURES}
  x = tf.keras.layers.Concatenate()([inputs[k] for k in FEATURES])
  x = tf.keras.layers.Rescaling(1 / 30.0)(x)
  y = tf.keras.layers.Dense(1, activation='sigmoid')(x)
  model = tf.keras.Model(inputs, y)
  model.compile(optimizer=tf.keras.optimizers.Adam(0.1),
                loss='binary_crossentropy', metrics=['binary_accuracy'])
  return model


def export(tf, model, export_dir: str) -> None:
  """A SavedModel whose `serving_default` takes serialized tf.Examples.

  Saved with `tf.saved_model.save` (TF 2.16's `tf.keras` is Keras 3, whose
  `model.save` writes `.keras` files only): TFMA then loads it as a plain
  SavedModel and calls the signature with the eval split's records.
  """
  spec = _feature_spec(tf, with_label=False)
  module = tf.Module()
  module.model = model

  @tf.function(input_signature=[
      tf.TensorSpec(shape=[None], dtype=tf.string, name='examples')])
  def serve_tf_examples(serialized):
    return {'outputs': module.model(_as_float(tf, tf.io.parse_example(
        serialized, spec)))}

  module.serve = serve_tf_examples
  tf.saved_model.save(module, export_dir,
                      signatures={'serving_default': serve_tf_examples})


def run_fn(fn_args):
  """TFX Trainer entry point: train, evaluate on the eval split, export."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert fn_args.train_files, 'the Trainer got no Examples'
  tf.keras.utils.set_random_seed(0)
  model = build_model(tf)
  model.fit(_dataset(tf, fn_args.train_files), epochs=60, verbose=0)
  _, accuracy = model.evaluate(_dataset(tf, fn_args.eval_files), verbose=0)
  assert accuracy >= 0.7, f'the tiny model did not learn: {accuracy}'

  export(tf, model, fn_args.serving_model_dir)
  assert os.path.exists(os.path.join(fn_args.serving_model_dir,
                                     'saved_model.pb'))

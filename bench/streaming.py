"""Time and memory of regression `adapt` on arrays against a streamed tf.data.Dataset.

Not a test. Workload: a float32 tanh MLP D → 64 → 64 → 1 (D = `--features`,
P = 64·D + 4,225 parameters, untrained weights from seed 0) on N examples
x ~ N(0, I_D), y = sin(Σ x / √D) + 0.1ε. `adapt` runs in parameter space with
the GGN product (one pass over the data per CG iteration), noise variance 0.1,
prior variance 1, tol 1e-6, the default Nyström preconditioner (rank 100, one
batched pass to sketch) and variance="none", so the time is the mean solve.
Three input modes, each in its own subprocess:

* `arrays`: NumPy arrays in memory;
* `dataset`: `tf.data.Dataset.from_tensor_slices((x, y)).batch(1024)`, which
  still keeps the arrays in memory but goes through the streamed code path;
* `tfrecord`: a TFRecord file written once to a temporary directory, parsed
  on every pass. The subprocess never keeps x in memory.

Each subprocess reports the median wall time of `--repeats` `adapt` calls
after one warm-up call, the CG iterations and the peak resident memory
(`getrusage` max RSS). It also reports the largest absolute difference of its
predictive mean on 1,000 test inputs from that of the `arrays` mode.

Run from the repository root:

    python bench/streaming.py --quick                 # N = 20,000, about a minute on 2 cores
    python bench/streaming.py --num-examples 1000000 --max-iterations 10 --repeats 1
                                                      # the memory comparison

The first output line names the machine, the library versions, the load
average and the command.
"""

import argparse
import json
import os
import pathlib
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_MODES = ("arrays", "dataset", "tfrecord")
_BATCH = 1024
_NUM_TEST = 1000


def main():
    arguments = _parse_arguments()
    if arguments.worker:
        _run_worker(arguments)
        return
    print(_environment_line(), flush=True)
    with tempfile.TemporaryDirectory() as directory:
        # The file is written by its own process, so no worker's peak memory counts the arrays.
        _launch(arguments, "write", directory)
        results = {}
        for mode in _MODES:
            results[mode] = _launch(arguments, mode, directory)
        reference = np.array(results["arrays"]["test_mean"])
        print(f"N={arguments.num_examples:,}, D={arguments.features}, "
              f"P={results['arrays']['num_parameters']:,}, repeats={arguments.repeats}, "
              f"max_iterations={arguments.max_iterations}")
        print("mode      median s  ratio  CG iters  peak RSS MiB  max |mean - arrays|")
        base = results["arrays"]["median_seconds"]
        for mode in _MODES:
            result = results[mode]
            difference = np.max(np.abs(np.array(result["test_mean"]) - reference))
            print(f"{mode:9s} {result['median_seconds']:8.2f}  {result['median_seconds'] / base:5.2f}"
                  f"  {result['iterations']:8d}  {result['peak_rss_mib']:12.0f}  {difference:.2e}")


def _parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-examples", type=int, default=200_000, help="training examples N")
    parser.add_argument("--features", type=int, default=32, help="input features D")
    parser.add_argument("--repeats", type=int, default=3, help="timed adapt calls per mode")
    parser.add_argument("--quick", action="store_true", help="N = 20,000 and 2 repeats")
    parser.add_argument("--max-iterations", type=int, default=None,
                        help="CG iteration limit (default: the solver's), e.g. for memory runs")
    parser.add_argument("--worker", choices=_MODES + ("write",), help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.quick:
        arguments.num_examples, arguments.repeats = 20_000, 2
    return arguments


def _launch(arguments, mode, directory):
    command = [
        sys.executable, __file__, "--worker", mode, "--directory", directory,
        "--num-examples", str(arguments.num_examples), "--features", str(arguments.features),
        "--repeats", str(arguments.repeats),
    ]
    if arguments.max_iterations is not None:
        command += ["--max-iterations", str(arguments.max_iterations)]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(
            f"Benchmark mode {mode!r} failed with exit code {completed.returncode}; "
            f"the end of its stderr:\n{completed.stderr[-4000:]}"
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _data(num_examples, features, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, features)).astype(np.float32)
    y = np.sin(x.sum(axis=1, keepdims=True) / np.sqrt(features))
    y += 0.1 * rng.standard_normal(y.shape)
    return x, y.astype(np.float32)


def _write_tfrecord(path, num_examples, features):
    import tensorflow as tf

    with tf.io.TFRecordWriter(str(path)) as writer:
        x, y = _data(num_examples, features, seed=0)
        for row, target in zip(x, y):
            example = tf.train.Example(features=tf.train.Features(feature={
                "x": tf.train.Feature(float_list=tf.train.FloatList(value=row)),
                "y": tf.train.Feature(float_list=tf.train.FloatList(value=target)),
            }))
            writer.write(example.SerializeToString())


def _tfrecord_dataset(path, features):
    import tensorflow as tf

    spec = {
        "x": tf.io.FixedLenFeature([features], tf.float32),
        "y": tf.io.FixedLenFeature([1], tf.float32),
    }

    def parse(serialized):
        parsed = tf.io.parse_example(serialized, spec)
        return parsed["x"], parsed["y"]

    return tf.data.TFRecordDataset(str(path)).batch(_BATCH).map(parse)


def _run_worker(arguments):
    import keras
    import tensorflow as tf

    import tf_linntk

    features, num_examples = arguments.features, arguments.num_examples
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((features,)),
        keras.layers.Dense(64, activation="tanh"),
        keras.layers.Dense(64, activation="tanh"),
        keras.layers.Dense(1),
    ])
    x_test = np.random.default_rng(1).standard_normal((_NUM_TEST, features)).astype(np.float32)

    path = pathlib.Path(arguments.directory) / "train.tfrecord"
    if arguments.worker == "write":
        _write_tfrecord(path, num_examples, features)
        print(json.dumps({}))
        return
    if arguments.worker == "tfrecord":
        data = (_tfrecord_dataset(path, features),)
    else:
        x, y = _data(num_examples, features, seed=0)
        if arguments.worker == "arrays":
            data = (x, y)
        else:
            data = (tf.data.Dataset.from_tensor_slices((x, y)).batch(_BATCH),)

    lin = tf_linntk.LinearizedModel(model, batch_size=_BATCH)
    options = dict(noise_variance=0.1, prior_variance=1.0, space="parameter", fisher="ggn",
                   variance="none", tol=1e-6, seed=0, max_iterations=arguments.max_iterations,
                   on_nonconvergence="ignore")
    lin.adapt(*data, **options)
    seconds = []
    for _ in range(arguments.repeats):
        started = time.perf_counter()
        lin.adapt(*data, **options)
        seconds.append(time.perf_counter() - started)
    record = lin.posterior.convergence["solve"]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "median_seconds": statistics.median(seconds),
        "iterations": int(np.max(record.iterations)),
        "peak_rss_mib": peak_kib / 1024,
        "num_parameters": lin.num_parameters,
        "test_mean": lin.predict(x_test, verbose=0).reshape(-1).tolist(),
    }))


def _environment_line():
    import importlib.metadata as metadata

    versions = ", ".join(
        f"{name} {metadata.version(name)}" for name in ("tensorflow", "keras", "numpy")
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {versions}; load average {load}; "
            f"command: python {shlex.join(sys.argv)}")


if __name__ == "__main__":
    main()

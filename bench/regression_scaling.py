"""Time finite-NTK GP regression as the training size N and the parameter count P grow.

Not a test. Workload: a tanh MLP 1 → W → W → 1 (P = W² + 4W + 1), briefly
trained (30 epochs of Adam in minibatches of 100) on 1,000 points of
y = 2 sin(1.2x + 0.5) + 0.1ε with x ~ U(−5, 5). The GP uses mean="zero",
prior variance 1 and noise variance 0.01, and predicts the mean and the
latent variance on 1,000 test inputs on linspace(−7, 7). Two sweeps:

* (a) N = 1k to 10k training points at W = 314 (P = 99,853);
* (b) W = 98 to 998 (P = 10k to 1M) at N = 1,000.

For each size and space ("function": CG on s²K + σ²I, "parameter": CG on the
Gauss–Newton system), one subprocess reports:

* one product: `lin.ntk(x).matvec` (function space) or
  `lin.fisher(x, "gaussian", method="ggn").matvec` (parameter space), first
  call (tracing included) and the median of `--repeats` calls after two
  warm-up calls;
* `adapt` + predictive mean and variance: the first call on the same
  `LinearizedModel`, then the median of `--adapt-repeats` further calls when
  the first took under `--warm-limit` seconds. The CG iterations of the mean
  solve and the Lanczos steps of the covariance root come with it;
* the peak resident memory of the subprocess (`getrusage` max RSS). The
  launching process imports only NumPy, so no case's TensorFlow memory
  counts toward another's.

The same sweeps run a dense GP on the explicit Jacobian: J = `lin.jacobian`,
K = J Jᵀ accumulated in float64 over column blocks of J, then
`tf.linalg.cholesky`, wherever J (N·P float32 values) fits in
`--max-jacobian-gib`. Its predictions are the reference for the relative errors of
the iterative predictive mean and variance. Least-squares fits on log-log
scales give the exponents of time against N and P, and the sizes where the
iterative solve overtakes the dense one are reported (interpolated, or
extrapolated from the fits when no measured pair of sizes brackets them).

A separate memory check runs N = 20,000 at W = 445 (P = 199,806) in function
space with `--target-batch-size`.

Run from the repository root:

    python bench/regression_scaling.py --quick          # a small grid, 2 to 3 minutes on 2 cores
    python bench/regression_scaling.py --parts n        # sweep (a) only
    python bench/regression_scaling.py                  # both sweeps and the memory check

The first output line names the machine, the library versions, the load
average and the command.
"""

import argparse
import json
import os
import pathlib
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]

NOISE_VARIANCE = 0.01
PRIOR_VARIANCE = 1.0
NUM_TEST = 1000
NUM_SOURCE = 1000
SPACES = ("function", "parameter")
GIB = 2.0**30

# Grids: (N, W) pairs of each sweep, the memory check, and the training budget
# of the source networks (Adam epochs over 1,000 points in minibatches of 100).
# Sweep (a) leaves out N = 20,000 at P = 99,853: the two sweeps as they are took
# about 9 minutes on a shared 2-core machine (load average 3 to 6), and the
# memory check covers N = 20,000 at twice that P.
FULL = dict(
    n_sweep=[(1000, 314), (2000, 314), (5000, 314), (10000, 314)],
    p_sweep=[(1000, 98), (1000, 222), (1000, 314), (1000, 546), (1000, 998)],
    target=(20000, 445),
    train_epochs=30,
    trimmed="Trimmed: sweep (a) stops at N = 10,000 instead of 20,000 to keep the two sweeps "
            "near 10 minutes on 2 cores. The memory check runs N = 20,000 at P = 199,806.",
)
QUICK = dict(
    n_sweep=[(500, 48), (2000, 48)],
    p_sweep=[(500, 48), (500, 222)],
    target=(4000, 98),
    train_epochs=30,
    trimmed="Quick run: a reduced grid, not the full one.",
)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker), args.worker_output)
        return
    config = QUICK if args.quick else FULL
    parts = parse_parts(args.parts)
    spaces = [space for space in args.spaces.split(",") if space]
    for space in spaces:
        if space not in SPACES:
            parser.error(f"--spaces must be a comma-separated subset of {SPACES}; received {space!r}.")

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="regression_scaling_") as scratch:
        scratch = pathlib.Path(scratch)
        widths = sorted({w for part in ("n", "p") if part in parts for _, w in config[f"{part}_sweep"]}
                        | ({config["target"][1]} if "target" in parts else set()))
        epochs = config["train_epochs"] if args.train_epochs is None else args.train_epochs
        load_at_start = os.getloadavg()[0]
        info = launch(dict(kind="prepare", widths=widths, epochs=epochs, scratch=str(scratch),
                           seed=args.seed), args.timeout)
        if "error" in info:
            sys.exit(f"Training the source networks failed:\n{info['error']}")
        print(header_line(info, load_at_start))
        print()
        print(f"Source networks: {epochs} Adam epochs on {NUM_SOURCE} points; "
              f"final training MSE per width: "
              + ", ".join(f"W={w}: {loss:.3g}" for w, loss in info["losses"].items()))

        runner = Runner(args, scratch)
        for part, title, axis in (("n", "(a) time against N", "N"), ("p", "(b) time against P", "P")):
            if part not in parts:
                continue
            rows = runner.sweep(config[f"{part}_sweep"], spaces)
            print(f"\n## {title}\n")
            print(sweep_table(rows))
            print()
            print(exponent_table(rows, axis, spaces))
            print()
            for line in crossover_lines(rows, axis, spaces):
                print(line)
        if "target" in parts:
            n, width = config["target"]
            row = runner.iterative(n, width, "function", args.target_batch_size)
            print(f"\n## Memory check: N = {n:,}, P = {num_parameters(width):,}, function space, "
                  f"batch_size = {args.target_batch_size}\n")
            print(sweep_table([row]))
            if row.get("peak_rss_gib") is not None:
                verdict = "under" if row["peak_rss_gib"] < 4.0 else "NOT under"
                print(f"\nPeak RSS {row['peak_rss_gib']:.2f} GiB: {verdict} the 4 GiB target.")

    print("\nNotes:")
    print(f"- {config['trimmed']}")
    print(f"- 1-minute load average at the end: {os.getloadavg()[0]:.1f} (other jobs share the "
          "machine when it exceeds nproc, and the timings then include waiting for a core).")
    print("- 'first' is the first call on a new LinearizedModel (tracing included). The adapt "
          "call follows the matvec timing in the same process, so the matvec products are "
          "already traced. 'warm' is the median of later calls (their count in brackets); they "
          f"run only when the first call took under --warm-limit = {args.warm_limit:g} s. The "
          "exponents and crossovers use the warm time, or the first time where no warm call "
          "ran (marked *). The dense GP runs once on 50 training and 20 test inputs before its "
          "timed calls, so all of them are warm.")
    print("- Peak RSS is the max RSS of the whole subprocess: TensorFlow, the model, the matvec "
          "timing and every adapt call.")
    print("- Relative errors are ‖a − b‖/‖b‖ of the predictive mean and latent variance on the "
          "1,000 test inputs, against the dense float64 GP of the same size.")
    for row in runner.results.values():
        if row.get("note"):
            print(f"- {row['note']}")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small grid (N ≤ 2,000, P ≤ 50k) and a memory check at N = 4,000")
    parser.add_argument("--parts", default="n,p,target",
                        help="comma-separated parts to run: n (sweep over N), p (sweep over P), "
                             "target (the memory check)")
    parser.add_argument("--spaces", default="function,parameter",
                        help="comma-separated solve spaces for the sweeps")
    parser.add_argument("--repeats", type=int, default=5, help="timed matvec calls per case")
    parser.add_argument("--adapt-repeats", type=int, default=1,
                        help="timed adapt + predict calls per case after the first call (only "
                             "when the first call took under --warm-limit)")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="`batch_size` of the LinearizedModel in the sweeps (examples per chunk)")
    parser.add_argument("--target-batch-size", type=int, default=128,
                        help="`batch_size` of the LinearizedModel in the memory check")
    parser.add_argument("--max-jacobian-gib", type=float, default=2.0,
                        help="largest dense Jacobian J [N, P] in GiB for which the dense GP runs")
    parser.add_argument("--warm-limit", type=float, default=30.0,
                        help="seconds: run the warm adapt calls only when the first call took less")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="Adam epochs of the source networks (default 30)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="wall-time limit in seconds of each subprocess")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and solvers")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", default=None, help=argparse.SUPPRESS)
    return parser


def parse_parts(text):
    parts = {part for part in text.split(",") if part}
    unknown = parts - {"n", "p", "target"}
    if unknown:
        sys.exit(f"--parts accepts n, p and target; received {sorted(unknown)}.")
    return parts


# ---------------------------------------------------------------------- launching process


def launch(spec, timeout):
    """Run one worker subprocess for `spec`; return its JSON result or {"error": text}."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        output = handle.name
    command = [sys.executable, str(pathlib.Path(__file__).resolve()),
               "--worker", json.dumps(spec), "--worker-output", output]
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    try:
        completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                   env=environment, cwd=REPOSITORY)
        if completed.returncode != 0:
            tail = "\n".join(completed.stderr.strip().splitlines()[-6:])
            return {"error": f"exit status {completed.returncode}: {tail}"}
        return json.loads(pathlib.Path(output).read_text())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        pathlib.Path(output).unlink(missing_ok=True)


class Runner:
    """Launches the measurement subprocesses and caches their results.

    A case shared by both sweeps (same N, W and space) runs once. After the
    library's default preconditioner raised in a space, later cases of that
    space run with preconditioner="none" directly, which saves one subprocess
    per case; each affected row is marked.
    """

    def __init__(self, args, scratch):
        self.args = args
        self.scratch = str(scratch)
        self.results = {}
        self.default_failed = {}

    def sweep(self, sizes, spaces):
        """Run every space and the dense GP at every (N, W); return the table rows."""
        rows = []
        for n, width in sizes:
            dense = self.dense(n, width)
            for space in spaces:
                row = dict(self.iterative(n, width, space, self.args.batch_size))
                if "mean_file" in dense and "mean_file" in row:
                    row["mean_error"], row["variance_error"] = relative_errors(row, dense)
                rows.append(row)
            rows.append(dense)
        return rows

    def dense(self, n, width):
        key = ("dense", n, width)
        if key not in self.results:
            p = num_parameters(width)
            jacobian_gib = 4.0 * p * max(n, NUM_TEST) / GIB
            if jacobian_gib <= self.args.max_jacobian_gib:
                spec = dict(kind="dense", n=n, width=width, batch_size=self.args.batch_size,
                            adapt_repeats=max(self.args.adapt_repeats, 1),
                            warm_limit=self.args.warm_limit, scratch=self.scratch, seed=self.args.seed)
                result = launch(spec, self.args.timeout)
            else:
                result = dict(skipped=f"skipped: J would take {jacobian_gib:.1f} GiB "
                                      f"> {self.args.max_jacobian_gib:g} GiB")
            self.results[key] = dict(result, method="dense", n=n, p=p)
        return self.results[key]

    def iterative(self, n, width, space, batch_size):
        """Run one iterative case; if the default preconditioner raises, rerun without one."""
        key = (space, n, width, batch_size)
        if key in self.results:
            return self.results[key]
        spec = dict(kind="iterative", n=n, width=width, space=space, batch_size=batch_size,
                    repeats=self.args.repeats, adapt_repeats=self.args.adapt_repeats,
                    warm_limit=self.args.warm_limit, scratch=self.scratch, seed=self.args.seed)
        note = None
        if space in self.default_failed:
            row = launch(dict(spec, preconditioner="none"), self.args.timeout)
            note = (f"N={n:,}, W={width}, {space} space: run with preconditioner='none' because "
                    f"the default raised at {self.default_failed[space]}.")
        else:
            row = launch(dict(spec, preconditioner="auto"), self.args.timeout)
            if "error" in row and "positive semi-definite" in row["error"]:
                failure = row["error"].splitlines()[-1]
                self.default_failed[space] = f"N={n:,}, W={width}"
                row = launch(dict(spec, preconditioner="none"), self.args.timeout)
                note = (f"N={n:,}, W={width}, {space} space: adapt with the default "
                        f"preconditioner raised ({failure}); the row shows preconditioner='none'.")
        if note is not None:
            row.update(note=note, fallback=True)
        row.update(method=space, n=n)
        row.setdefault("p", num_parameters(width))
        self.results[key] = row
        return row


def num_parameters(width):
    """Return P of the MLP 1 → W → W → 1."""
    return width * width + 4 * width + 1


def relative_errors(row, dense):
    """Return ‖a − b‖/‖b‖ of the predictive mean and variance against the dense GP."""
    ours, reference = np.load(row["mean_file"]), np.load(dense["mean_file"])
    return tuple(
        float(np.linalg.norm(ours[key] - reference[key]) / np.linalg.norm(reference[key]))
        for key in ("mean", "variance")
    )


# ---------------------------------------------------------------------- reporting


def header_line(info, load_average):
    cpu_model = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    command = "python " + shlex.join(sys.argv)
    return (f"machine: nproc={len(os.sched_getaffinity(0))}, CPU {cpu_model}; "
            f"TensorFlow {info['tensorflow']}, Keras {info['keras']}, TFP {info['tfp']}, "
            f"tf_linntk {info['tf_linntk']}; 1-minute load average {load_average:.1f}; "
            f"command: `{command}`")


def sweep_table(rows):
    header = ["N", "P", "method", "matvec first (s)", "matvec warm (ms)", "CG its",
              "Lanczos steps", "adapt+predict first (s)", "adapt+predict warm (s)",
              "peak RSS (GiB)", "mean rel. err", "var rel. err"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        method = row["method"] + (" (no precond.)" if row.get("fallback") else "")
        if "skipped" in row or "error" in row:
            reason = row.get("skipped") or "failed: " + row["error"].splitlines()[-1][:150]
            cells = [f"{row['n']:,}", f"{row['p']:,}", method, reason] + [""] * (len(header) - 4)
        else:
            cells = [
                f"{row['n']:,}", f"{row['p']:,}", method,
                _format(row.get("matvec_first"), "{:.2f}"),
                _format(row.get("matvec_warm"), "{:.1f}", 1e3),
                _format(row.get("cg_iterations"), "{}"),
                _format(row.get("lanczos_steps"), "{}"),
                _format(row.get("adapt_first"), "{:.2f}"),
                _format(row.get("adapt_warm"), "{:.2f}") + f" [{len(row.get('adapt_times', []))}]",
                _format(row.get("peak_rss_gib"), "{:.2f}"),
                _format(row.get("mean_error"), "{:.1e}"),
                _format(row.get("variance_error"), "{:.1e}"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format(value, template, scale=1.0):
    if value is None:
        return "–"
    return template.format(value * scale if isinstance(value, float) else value)


def fitted_exponent(sizes, times):
    """Return the slope of log(time) against log(size) by least squares, or None."""
    if len(sizes) < 2:
        return None
    slope, _ = np.polyfit(np.log(sizes), np.log(times), 1)
    return float(slope)


def _series(rows, method, key, axis):
    """Return (sizes, values, first-only flags) of `key` for one method's rows.

    `key` "adapt" takes the warm adapt time, or the first-call time (flagged)
    where no warm call ran.
    """
    sizes, values, first_only = [], [], []
    for row in rows:
        if row["method"] != method:
            continue
        value, flag = row.get(key), False
        if key == "adapt":
            value = row.get("adapt_warm")
            if value is None:
                value, flag = row.get("adapt_first"), True
        if value is not None:
            sizes.append(row["n"] if axis == "N" else row["p"])
            values.append(value)
            first_only.append(flag)
    return sizes, values, first_only


def exponent_table(rows, axis, spaces):
    lines = [f"| quantity | method | fitted exponent of time vs {axis} | sizes fitted |",
             "|---|---|---|---|"]
    for key, label in (("matvec_warm", "matvec"), ("adapt", "adapt + predict")):
        methods = list(spaces) + (["dense"] if key == "adapt" else [])
        for method in methods:
            sizes, times, first_only = _series(rows, method, key, axis)
            slope = fitted_exponent(sizes, times)
            fitted = ", ".join(f"{s:,}" + ("*" if marked else "") for s, marked in zip(sizes, first_only))
            lines.append(f"| {label} | {method} | {_format(slope, '{:.2f}')} | {fitted} |")
    return "\n".join(lines)


def crossover_lines(rows, axis, spaces):
    """Describe where the fastest iterative solve overtakes the dense GP.

    Uses the adapt + predict times of `_series` (warm, or first where no warm
    call ran).
    """
    dense_sizes, dense_times, _ = _series(rows, "dense", "adapt", axis)
    best = {}
    for space in spaces:
        sizes, values, _ = _series(rows, space, "adapt", axis)
        for size, value in zip(sizes, values):
            best[size] = min(best.get(size, np.inf), value)
    common = [size for size in dense_sizes if size in best]
    if not common:
        return [f"Crossover in {axis}: not measurable (no size with both a dense and an iterative time)."]

    ratio = {size: dense_times[dense_sizes.index(size)] / best[size] for size in common}
    iterative_sizes = sorted(best)
    slopes = (fitted_exponent(dense_sizes, dense_times),
              fitted_exponent(iterative_sizes, [best[size] for size in iterative_sizes]))
    lines = [
        "Dense time / fastest iterative time: "
        + ", ".join(f"{axis}={size:,}: {ratio[size]:.2f}" for size in common),
        f"Crossover in {axis}: " + _crossover_sentence(common, ratio, slopes),
    ]

    skipped = [row for row in rows if row["method"] == "dense" and "skipped" in row]
    if skipped:
        first = min(row["n"] if axis == "N" else row["p"] for row in skipped)
        lines.append(f"The dense GP did not run from {axis} = {first:,} on (Jacobian above the limit).")
    return lines


def _crossover_sentence(sizes, ratio, slopes):
    """Return where ratio = dense time / iterative time crosses 1, measured or estimated."""
    for low, high in zip(sizes, sizes[1:]):
        if ratio[low] < 1.0 <= ratio[high]:
            # Interpolate log(ratio) linearly in log(size) between the bracketing sizes.
            t = -np.log(ratio[low]) / (np.log(ratio[high]) - np.log(ratio[low]))
            crossing = float(np.exp(np.log(low) + t * (np.log(high) - np.log(low))))
            return (f"the iterative solve becomes faster between {low:,} and {high:,} "
                    f"(log-log interpolation: about {crossing:,.0f}).")

    dense_slope, iterative_slope = slopes
    if all(value >= 1.0 for value in ratio.values()):
        sentence = f"the iterative solve is faster at every size measured (from {sizes[0]:,})"
        anchor = sizes[0]
    elif all(value < 1.0 for value in ratio.values()):
        sentence = "the dense GP is faster at every size where it ran"
        anchor = sizes[-1]
    else:
        return "the ratio is not monotonic in size, so no crossover is estimated."
    if dense_slope is None or iterative_slope is None or dense_slope <= iterative_slope:
        return sentence + ", and the fitted exponents give no crossing."
    # ratio(s) ≈ ratio(anchor)·(s/anchor)^(dense_slope − iterative_slope); solve ratio(s) = 1.
    crossing = anchor * ratio[anchor] ** (-1.0 / (dense_slope - iterative_slope))
    return (f"{sentence}; extrapolating the fitted exponents ({dense_slope:.2f} dense, "
            f"{iterative_slope:.2f} iterative) gives an estimate of {crossing:,.0f}.")


# ---------------------------------------------------------------------- worker subprocesses


def run_worker(spec, output):
    """Run one measurement described by `spec` and write its JSON result to `output`."""
    sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "examples")]
    if spec["kind"] == "prepare":
        result = prepare_networks(spec)
    elif spec["kind"] == "iterative":
        result = measure_iterative(spec)
    else:
        result = measure_dense(spec)
    result["peak_rss_gib"] = peak_rss_gib()
    pathlib.Path(output).write_text(json.dumps(result))


def peak_rss_gib():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # Linux reports KiB


def build_mlp(width):
    import keras

    return keras.Sequential([
        keras.Input((1,)),
        keras.layers.Dense(width, activation="tanh"),
        keras.layers.Dense(width, activation="tanh"),
        keras.layers.Dense(1),
    ])


def sinusoid_data(num_examples, seed):
    """Return x [N, 1] ~ U(−5, 5) and y = 2 sin(1.2x + 0.5) + 0.1ε [N, 1], float32."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-5.0, 5.0, (num_examples, 1))
    y = 2.0 * np.sin(1.2 * x + 0.5) + 0.1 * rng.standard_normal(x.shape)
    return x.astype("float32"), y.astype("float32")


def evaluation_inputs():
    return np.linspace(-7.0, 7.0, NUM_TEST)[:, None].astype("float32")


def weights_path(scratch, width):
    return pathlib.Path(scratch) / f"mlp_w{width}.npz"


def prepare_networks(spec):
    """Train one MLP per width on the source data and save its weights; return versions and losses."""
    import _common
    import keras
    import tensorflow as tf
    import tensorflow_probability as tfp

    import tf_linntk

    x, y = sinusoid_data(NUM_SOURCE, spec["seed"] + 1)
    losses = {}
    for width in spec["widths"]:
        keras.utils.set_random_seed(spec["seed"])
        model = build_mlp(width)
        _common.train(model, x, y, keras.losses.mean_squared_error, epochs=spec["epochs"],
                      learning_rate=3e-3, batch_size=100, seed=spec["seed"])
        losses[width] = float(np.mean(np.square(model(x).numpy() - y)))
        np.savez(weights_path(spec["scratch"], width), *model.get_weights())
    return dict(tensorflow=tf.__version__, keras=keras.__version__, tfp=tfp.__version__,
                tf_linntk=tf_linntk.__version__, losses=losses)


def load_mlp(scratch, width):
    model = build_mlp(width)
    stored = np.load(weights_path(scratch, width))
    model.set_weights([stored[f"arr_{i}"] for i in range(len(stored.files))])
    return model


def time_calls(fn, repeats):
    """Return (first-call seconds, median seconds of `repeats` calls after two warm-up calls)."""
    start = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - start
    _block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _block(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _block(result):
    """Copy every tensor of `result` to NumPy, so that a timing includes the computation."""
    import tensorflow as tf

    for tensor in tf.nest.flatten(result):
        np.asarray(tensor)


def measure_iterative(spec):
    """Time one matvec and adapt + predictive mean and variance in one space."""
    import tensorflow as tf

    import tf_linntk

    x, y = sinusoid_data(spec["n"], spec["seed"])
    x_test = evaluation_inputs()
    model = load_mlp(spec["scratch"], spec["width"])
    lin = tf_linntk.LinearizedModel(model, mean="zero", batch_size=spec["batch_size"])
    rng = np.random.default_rng(spec["seed"])
    if spec["space"] == "function":
        operator = lin.ntk(x)
        vector = tf.constant(rng.standard_normal(spec["n"]), tf.float32)
    else:
        operator = lin.fisher(x, "gaussian", method="ggn")
        vector = tf.constant(rng.standard_normal(lin.num_parameters), tf.float32)
    matvec_first, matvec_warm = time_calls(lambda: operator.matvec(vector), spec["repeats"])

    def adapt_and_predict():
        lin.adapt(x, y, noise_variance=NOISE_VARIANCE, prior_variance=PRIOR_VARIANCE,
                  space=spec["space"], preconditioner=spec["preconditioner"], seed=spec["seed"])
        predictive = lin.predictive_distribution(x_test, include_noise=False)
        return predictive.mean().numpy()[:, 0], predictive.variance().numpy()[:, 0]

    (adapt_first,), (mean, variance) = time_with_result(adapt_and_predict, 1)
    adapt_times = []
    if adapt_first < spec["warm_limit"] and spec["adapt_repeats"] > 0:
        adapt_times, (mean, variance) = time_with_result(adapt_and_predict, spec["adapt_repeats"])
    record = lin.posterior.convergence
    mean_file = pathlib.Path(spec["scratch"]) / f"iterative_{spec['space']}_{spec['n']}_{spec['width']}.npz"
    np.savez(mean_file, mean=mean, variance=variance)
    return dict(
        p=lin.num_parameters,
        matvec_first=matvec_first,
        matvec_warm=matvec_warm,
        adapt_first=adapt_first,
        adapt_times=adapt_times,
        adapt_warm=statistics.median(adapt_times) if adapt_times else None,
        cg_iterations=int(np.max(record["solve"].iterations)),
        lanczos_steps=int(record["lanczos"]["iterations"]),
        mean_file=str(mean_file),
    )


def time_with_result(fn, count, limit=float("inf")):
    """Call fn up to `count` times, stopping after a call that took `limit` seconds or more.

    Returns:
        (list of the seconds of each call, the last call's result).
    """
    times, result = [], None
    for _ in range(count):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
        if times[-1] >= limit:
            break
    return times, result


def measure_dense(spec):
    """Time the dense GP: explicit Jacobians, float64 K = J Jᵀ, Cholesky, mean and variance."""
    import tf_linntk

    x, y = sinusoid_data(spec["n"], spec["seed"])
    x_test = evaluation_inputs()
    model = load_mlp(spec["scratch"], spec["width"])
    lin = tf_linntk.LinearizedModel(model, mean="zero", batch_size=spec["batch_size"])
    # A whole run on 50 training and 20 test inputs first: it traces `lin.jacobian`
    # and creates the eager kernels, which otherwise cost about 1 s in the first call.
    dense_gp(lin, x[:50], y[:50], x_test[:20])
    times, (mean, variance) = time_with_result(
        lambda: dense_gp(lin, x, y, x_test), spec["adapt_repeats"], spec["warm_limit"]
    )
    mean_file = pathlib.Path(spec["scratch"]) / f"dense_{spec['n']}_{spec['width']}.npz"
    np.savez(mean_file, mean=mean, variance=variance)
    return dict(p=lin.num_parameters, adapt_times=times, adapt_warm=statistics.median(times),
                mean_file=str(mean_file))


def dense_gp(lin, x, y, x_test):
    """Return the GP predictive mean [T] and latent variance [T] by a dense Cholesky factorization."""
    import tensorflow as tf

    n, num_test = len(x), len(x_test)
    limit = 4 * lin.num_parameters * max(n, num_test) + 1
    jacobian = tf.reshape(lin.jacobian(x, max_dense_bytes=limit), [n, -1])  # [N, P]
    test_jacobian = tf.reshape(lin.jacobian(x_test, max_dense_bytes=limit), [num_test, -1])  # [T, P]
    kernel, cross, test_diagonal = _dense_kernels(jacobian, test_jacobian)
    del jacobian, test_jacobian
    shifted = PRIOR_VARIANCE * kernel + NOISE_VARIANCE * tf.eye(n, dtype=tf.float64)
    lower = tf.linalg.cholesky(shifted)  # [N, N]
    alpha = tf.linalg.cholesky_solve(lower, tf.constant(y, tf.float64))  # [N, 1]
    mean = PRIOR_VARIANCE * tf.matmul(cross, alpha)[:, 0]  # [T]
    half = tf.linalg.triangular_solve(lower, tf.transpose(cross), lower=True)  # [N, T]
    variance = PRIOR_VARIANCE * test_diagonal - PRIOR_VARIANCE**2 * tf.reduce_sum(tf.square(half), axis=0)
    return mean.numpy(), variance.numpy()


def _dense_kernels(jacobian, test_jacobian, block=8192):
    """Return K(X, X) [N, N], K(X*, X) [T, N] and diag K(X*, X*) [T] in float64.

    The float32 Jacobians are cast to float64 one block of parameter columns at a
    time, so the extra memory is one block, not a float64 copy of J. Float32
    sums would carry errors of order 1e-7·‖K‖ (an estimate), as large as
    σ² = 0.01 once ‖K‖ reaches 1e5.
    """
    import tensorflow as tf

    n, t = int(jacobian.shape[0]), int(test_jacobian.shape[0])
    kernel = tf.zeros([n, n], tf.float64)
    cross = tf.zeros([t, n], tf.float64)
    test_diagonal = tf.zeros([t], tf.float64)
    for start in range(0, int(jacobian.shape[1]), block):
        train_block = tf.cast(jacobian[:, start:start + block], tf.float64)
        test_block = tf.cast(test_jacobian[:, start:start + block], tf.float64)
        kernel += tf.matmul(train_block, train_block, transpose_b=True)
        cross += tf.matmul(test_block, train_block, transpose_b=True)
        test_diagonal += tf.reduce_sum(tf.square(test_block), axis=1)
    return kernel, cross, test_diagonal


if __name__ == "__main__":
    main()

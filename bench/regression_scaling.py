"""Time finite-NTK GP regression as the training size N and the parameter count P grow.

Not a test. Workload: a tanh MLP 1 → W → W → 1 (P = W² + 4W + 1), briefly
trained (Adam, minibatches of 100) on 1,000 points of y = 2 sin(1.2x + 0.5) +
0.1ε with x ~ U(−5, 5). The GP uses mean="zero", prior variance 1 and noise
variance 0.01, and predicts the mean and the latent variance on 1,000 test
inputs on linspace(−7, 7). Two sweeps:

* (a) N = 1k to 20k training points at W = 314 (P = 99,853);
* (b) W = 98 to 998 (P = 10k to 1M) at N = 1,000.

For each size and space ("function": CG on s²K + σ²I, "parameter": CG on the
Gauss–Newton system), one subprocess reports:

* one product: `lin.ntk(x).matvec` (function space) or
  `lin.fisher(x, "gaussian", method="ggn").matvec` (parameter space), first
  call (tracing included) and the median of `--repeats` calls after two
  warm-up calls;
* `adapt` + predictive mean and variance: the first call, and the median of
  `--adapt-repeats` further calls on the same `LinearizedModel`; the CG
  iterations of the mean solve and the Lanczos steps of the covariance root;
* the peak resident memory of the subprocess (`getrusage` max RSS). The
  launching process never imports TensorFlow, so its memory does not count.

The same sweeps run a dense GP on the explicit Jacobian: J = `lin.jacobian`,
K = J Jᵀ accumulated in float64 over column blocks of J, then
`tf.linalg.cholesky`, wherever J (N·P float32 values) fits in
`--max-jacobian-gib`. Its answers are the reference for the relative errors of
the iterative predictive mean and variance. Least-squares fits on log-log
scales give the exponents of time against N and P, and the sizes where the
iterative solve overtakes the dense one are reported (interpolated, or
extrapolated from the fits when no measured size brackets them).

A separate memory check runs N = 20,000 at W = 445 (P = 199,806) in function
space with `--target-batch-size`.

Run from the repository root:

    python bench/regression_scaling.py --quick          # a small grid, about 3 minutes
    python bench/regression_scaling.py                  # full grid and the memory check
    python bench/regression_scaling.py --parts target   # only the memory check

The first output line names the machine, the library versions and the command.
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
FULL = dict(
    n_sweep=[(1000, 314), (2000, 314), (5000, 314), (10000, 314), (20000, 314)],
    p_sweep=[(1000, 98), (1000, 222), (1000, 314), (1000, 546), (1000, 998)],
    target=(20000, 445),
    train_epochs=100,
)
QUICK = dict(
    n_sweep=[(500, 98), (1000, 98), (2000, 98)],
    p_sweep=[(500, 48), (500, 98), (500, 222)],
    target=(4000, 98),
    train_epochs=30,
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
        info = launch(dict(kind="prepare", widths=widths, epochs=config["train_epochs"],
                           scratch=str(scratch), seed=args.seed), args.timeout)
        if "error" in info:
            sys.exit(f"Training the source networks failed:\n{info['error']}")
        print(header_line(info))
        print()
        print(f"Source networks: {config['train_epochs']} Adam epochs on {NUM_SOURCE} points; "
              f"final training MSE per width: "
              + ", ".join(f"W={w}: {loss:.3g}" for w, loss in info["losses"].items()))

        notes = []
        for part, title, axis in (("n", "(a) time against N", "N"), ("p", "(b) time against P", "P")):
            if part not in parts:
                continue
            rows = run_sweep(config[f"{part}_sweep"], spaces, args, scratch)
            print(f"\n## {title}\n")
            print(sweep_table(rows))
            print()
            print(exponent_table(rows, axis, spaces))
            print()
            for line in crossover_lines(rows, axis, spaces):
                print(line)
            notes += [row["note"] for row in rows if row.get("note")]
        if "target" in parts:
            n, width = config["target"]
            spec = dict(kind="iterative", n=n, width=width, space="function",
                        batch_size=args.target_batch_size, repeats=args.repeats,
                        adapt_repeats=0, scratch=str(scratch), seed=args.seed)
            row = run_iterative(spec, args.timeout)
            print(f"\n## Memory check: N = {n:,}, P = {row.get('p', width * width + 4 * width + 1):,}, "
                  f"function space, batch_size = {args.target_batch_size}\n")
            print(sweep_table([row]))
            if row.get("peak_rss_gib") is not None:
                verdict = "under" if row["peak_rss_gib"] < 4.0 else "NOT under"
                print(f"\nPeak RSS {row['peak_rss_gib']:.2f} GiB: {verdict} the 4 GiB target.")
            notes += [row["note"]] if row.get("note") else []

    print("\nNotes:")
    print(f"- Omitted from the grid asked for: {args.trimmed}" if args.trimmed else
          "- Nothing trimmed from the configured grid.")
    print("- 'first' is the first call on a new LinearizedModel (tracing included). The adapt "
          "call follows the matvec timing in the same process, so traces of the matvec products "
          "are already done; 'warm' is the median of later calls (count in brackets).")
    print("- Peak RSS is the max RSS of the whole subprocess: TensorFlow, the model, both "
          "adapt calls and the matvec timing.")
    for note in notes:
        print(f"- {note}")
    print(f"\nTotal wall time: {time.perf_counter() - start:.0f} s")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small grid (N ≤ 2,000, P ≤ 50k) and a small memory check")
    parser.add_argument("--parts", default="n,p,target",
                        help="comma-separated parts to run: n (sweep over N), p (sweep over P), "
                             "target (the memory check)")
    parser.add_argument("--spaces", default="function,parameter",
                        help="comma-separated solve spaces for the sweeps")
    parser.add_argument("--repeats", type=int, default=5, help="timed matvec calls per case")
    parser.add_argument("--adapt-repeats", type=int, default=1,
                        help="timed adapt + predict calls per case after the first call")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="`batch_size` of the LinearizedModel in the sweeps (examples per chunk)")
    parser.add_argument("--target-batch-size", type=int, default=128,
                        help="`batch_size` of the LinearizedModel in the memory check")
    parser.add_argument("--max-jacobian-gib", type=float, default=2.0,
                        help="largest dense Jacobian J [N, P] in GiB for which the dense GP runs")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="wall-time limit in seconds of each subprocess")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and solvers")
    parser.add_argument("--trimmed", default="",
                        help="text printed in the notes to say which requested sizes were left out")
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


def run_sweep(sizes, spaces, args, scratch):
    """Run every space and the dense GP at every (N, W); return the table rows."""
    rows = []
    for n, width in sizes:
        common = dict(n=n, width=width, batch_size=args.batch_size, scratch=str(scratch),
                      seed=args.seed)
        p = width * width + 4 * width + 1
        jacobian_gib = 4.0 * p * max(n, NUM_TEST) / GIB
        if jacobian_gib <= args.max_jacobian_gib:
            dense = launch(dict(common, kind="dense", adapt_repeats=args.adapt_repeats), args.timeout)
            dense.update(method="dense", n=n, p=p)
        else:
            dense = dict(method="dense", n=n, p=p,
                         skipped=f"J would take {jacobian_gib:.1f} GiB > {args.max_jacobian_gib:g} GiB")
        for space in spaces:
            spec = dict(common, kind="iterative", space=space, repeats=args.repeats,
                        adapt_repeats=args.adapt_repeats)
            row = run_iterative(spec, args.timeout)
            if "mean_file" in dense and "mean_file" in row:
                row["mean_error"], row["variance_error"] = relative_errors(row, dense)
            rows.append(row)
        rows.append(dense)
    return rows


def run_iterative(spec, timeout):
    """Run one iterative case; if the default preconditioner fails, rerun without one."""
    row = launch(dict(spec, preconditioner="auto"), timeout)
    if "error" in row and "positive semi-definite" in row["error"]:
        failure = row["error"].splitlines()[-1]
        row = launch(dict(spec, preconditioner="none"), timeout)
        row["note"] = (f"N={spec['n']:,}, W={spec['width']}, {spec['space']} space: adapt with the "
                       f"default preconditioner raised ({failure}); the row shows "
                       "preconditioner='none'.")
        row["fallback"] = True
    row.update(method=spec["space"], n=spec["n"])
    row.setdefault("p", spec["width"] ** 2 + 4 * spec["width"] + 1)
    return row


def relative_errors(row, dense):
    """Return ‖a − b‖/‖b‖ of the predictive mean and variance against the dense GP."""
    ours, reference = np.load(row["mean_file"]), np.load(dense["mean_file"])
    return tuple(
        float(np.linalg.norm(ours[key] - reference[key]) / np.linalg.norm(reference[key]))
        for key in ("mean", "variance")
    )


# ---------------------------------------------------------------------- reporting


def header_line(info):
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
            f"tf_linntk {info['tf_linntk']}; command: `{command}`")


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
    points = [(row["n"] if axis == "N" else row["p"], row[key]) for row in rows
              if row["method"] == method and row.get(key) is not None]
    return [size for size, _ in points], [value for _, value in points]


def exponent_table(rows, axis, spaces):
    lines = [f"| quantity | method | fitted exponent of time vs {axis} | sizes fitted |",
             "|---|---|---|---|"]
    for key, label in (("matvec_warm", "matvec"), ("adapt_warm", "adapt + predict")):
        methods = list(spaces) + (["dense"] if key == "adapt_warm" else [])
        for method in methods:
            sizes, times = _series(rows, method, key, axis)
            slope = fitted_exponent(sizes, times)
            fitted = ", ".join(f"{s:,}" for s in sizes)
            lines.append(f"| {label} | {method} | {_format(slope, '{:.2f}')} | {fitted} |")
    return "\n".join(lines)


def crossover_lines(rows, axis, spaces):
    """Describe where the fastest iterative solve overtakes the dense GP (warm times)."""
    dense_sizes, dense_times = _series(rows, "dense", "adapt_warm", axis)
    best = {}
    for space in spaces:
        for size, value in zip(*_series(rows, space, "adapt_warm", axis)):
            best[size] = min(best.get(size, np.inf), value)
    common = [s for s in dense_sizes if s in best]
    if not common:
        return [f"Crossover in {axis}: not measurable (no size with both a dense and an iterative time)."]
    ratio = {s: dense_times[dense_sizes.index(s)] / best[s] for s in common}
    lines = ["Dense time / fastest iterative time: "
             + ", ".join(f"{axis}={s:,}: {ratio[s]:.2f}" for s in common)]
    for low, high in zip(common, common[1:]):
        if ratio[low] < 1.0 <= ratio[high]:
            # Interpolate log(ratio) linearly in log(size) between the bracketing sizes.
            t = -np.log(ratio[low]) / (np.log(ratio[high]) - np.log(ratio[low]))
            crossing = float(np.exp(np.log(low) + t * (np.log(high) - np.log(low))))
            lines.append(f"Crossover in {axis}: the iterative solve becomes faster between "
                         f"{low:,} and {high:,} (log-log interpolation: about {crossing:,.0f}).")
            return lines
    iterative_sizes = sorted(best)
    dense_slope = fitted_exponent(dense_sizes, dense_times)
    iterative_slope = fitted_exponent(iterative_sizes, [best[s] for s in iterative_sizes])
    if all(r >= 1.0 for r in ratio.values()):
        lines.append(f"Crossover in {axis}: the iterative solve is already faster at the smallest "
                     f"size measured ({common[0]:,}).")
    elif dense_slope is not None and iterative_slope is not None and dense_slope > iterative_slope:
        # Extrapolate both power laws from the largest common size.
        last = common[-1]
        crossing = last * ratio[last] ** (-1.0 / (dense_slope - iterative_slope))
        lines.append(f"Crossover in {axis}: the dense GP is faster at every size where it ran; "
                     f"extrapolating the fitted exponents ({dense_slope:.2f} dense, "
                     f"{iterative_slope:.2f} iterative) gives an estimate of {crossing:,.0f}.")
    else:
        lines.append(f"Crossover in {axis}: the dense GP is faster at every size where it ran, "
                     "and the fitted exponents give no crossing.")
    skipped = [row for row in rows if row["method"] == "dense" and "skipped" in row]
    if skipped:
        first = min(row["n"] if axis == "N" else row["p"] for row in skipped)
        lines.append(f"The dense GP did not run from {axis} = {first:,} on (Jacobian above the limit).")
    return lines


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


def test_inputs():
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
    x_test = test_inputs()
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

    adapt_first, adapt_times = _time_adapt(adapt_and_predict, spec["adapt_repeats"])
    mean, variance = adapt_times.pop()
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


def _time_adapt(fn, repeats):
    """Return (first-call seconds, [seconds of each later call..., last (mean, variance)])."""
    start = time.perf_counter()
    result = fn()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return first, times + [result]


def measure_dense(spec):
    """Time the dense GP: explicit Jacobians, float64 K = J Jᵀ, Cholesky, mean and variance."""
    import tensorflow as tf

    import tf_linntk

    x, y = sinusoid_data(spec["n"], spec["seed"])
    x_test = test_inputs()
    model = load_mlp(spec["scratch"], spec["width"])
    lin = tf_linntk.LinearizedModel(model, mean="zero", batch_size=spec["batch_size"])
    limit = 4 * lin.num_parameters * max(spec["n"], NUM_TEST) + 1

    def dense_gp():
        jacobian = tf.reshape(lin.jacobian(x, max_dense_bytes=limit), [spec["n"], -1])  # [N, P]
        test_jacobian = tf.reshape(lin.jacobian(x_test, max_dense_bytes=limit), [NUM_TEST, -1])
        kernel, cross, test_diagonal = _dense_kernels(jacobian, test_jacobian)
        del jacobian, test_jacobian
        shifted = PRIOR_VARIANCE * kernel + NOISE_VARIANCE * tf.eye(spec["n"], dtype=tf.float64)
        lower = tf.linalg.cholesky(shifted)  # [N, N]
        alpha = tf.linalg.cholesky_solve(lower, tf.constant(y, tf.float64))  # [N, 1]
        mean = PRIOR_VARIANCE * tf.matmul(cross, alpha)[:, 0]  # [T]
        half = tf.linalg.triangular_solve(lower, tf.transpose(cross), lower=True)  # [N, T]
        variance = (PRIOR_VARIANCE * test_diagonal
                    - PRIOR_VARIANCE**2 * tf.reduce_sum(tf.square(half), axis=0))
        return mean.numpy(), variance.numpy()

    first, times = _time_adapt(dense_gp, spec["adapt_repeats"])
    mean, variance = times.pop()
    mean_file = pathlib.Path(spec["scratch"]) / f"dense_{spec['n']}_{spec['width']}.npz"
    np.savez(mean_file, mean=mean, variance=variance)
    return dict(p=lin.num_parameters, adapt_first=first, adapt_times=times,
                adapt_warm=statistics.median(times) if times else None, mean_file=str(mean_file))


def _dense_kernels(jacobian, test_jacobian, block=8192):
    """Return K(X, X) [N, N], K(X*, X) [T, N] and diag K(X*, X*) [T] in float64.

    The float32 Jacobians are cast to float64 one block of parameter columns at a
    time, so the extra memory is one block, not a float64 copy of J. Float32
    products would leave errors near 1e-7·‖K‖, above σ² = 0.01 when ‖K‖ ~ 1e5.
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

"""Transferability test: Jacobian similarity of networks trained on the same or on shifted data.

Several small MLP classifiers (10 digit classes, the same architecture) are
trained on scikit-learn's 8×8 digits, on half A or half B of the training
images. Others are trained on two shifted copies of half A, with a fixed random
permutation of the 64 pixels or with inverted intensities (1 − x). These are
tasks with the same classes and a different input distribution. Every pair of
networks is compared with `tf_linntk.similarity.jacobian_similarity` on the
same held-out (unshifted) images: the alignment ⟨K_a, K_b⟩_F / (‖K_a‖_F ‖K_b‖_F)
of their finite NTKs K = J Jᵀ. Networks trained on the same distribution should
have more similar Jacobians than a network trained on shifted inputs, which is
what makes the similarity a cheap check of whether a trained network will
transfer.

Run:  python examples/jacobian_similarity.py [--quick] [--output DIR] [--seed S]
"""

import itertools
import sys

import _common
import keras
import numpy as np
from sklearn.datasets import load_digits

import tf_linntk
from tf_linntk import metrics
from tf_linntk.similarity import jacobian_similarity

TASKS = ("half_a", "half_b", "permuted", "inverted")
SHIFTED_TASKS = ("permuted", "inverted")
GROUPS = ("same half, other seed", "other half", "permuted pixels", "inverted images")

FULL = dict(models_per_task=4, num_probes=50, epochs=40)
QUICK = dict(models_per_task=2, num_probes=30, epochs=20)


def main(argv=None):
    """Run the example; return {"groups": {group: {"mean", "std", "count"}}, "accuracy": {...}}."""
    args = _common.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    output = _common.prepare_run(args, "jacobian_similarity")
    config = QUICK if args.quick else FULL
    rng = np.random.default_rng(args.seed)
    data = _split_data(rng, config["num_probes"])

    models, accuracy = {}, {task: [] for task in TASKS}
    for task in TASKS:
        for index in range(config["models_per_task"]):
            seed = args.seed + 100 * TASKS.index(task) + index
            keras.utils.set_random_seed(seed)
            network = _train_classifier(data[task], config["epochs"], seed)
            x_test, y_test = data[task + "_test"]
            probs = keras.activations.softmax(network(x_test)).numpy()
            accuracy[task].append(metrics.accuracy(y_test, probs))
            # A LinearizedModel per network keeps its compiled products for every pair.
            models[task, index] = tf_linntk.LinearizedModel(network)

    similarities = {group: [] for group in GROUPS}
    for (key_a, lin_a), (key_b, lin_b) in itertools.combinations(models.items(), 2):
        group = _pair_group(key_a[0], key_b[0])
        if group is not None:
            similarities[group].append(jacobian_similarity(lin_a, lin_b, data["probes"]))

    summary = {
        "groups": {
            group: dict(zip(("mean", "std"), _common.mean_and_std(values)), count=len(values))
            for group, values in similarities.items()
        },
        "accuracy": {task: _common.mean_and_std(values)[0] for task, values in accuracy.items()},
    }
    _write_outputs(output, summary, similarities)
    return summary


def _split_data(rng, num_probes):
    """Split the digits into probes, halves A and B, and shifted copies of A, each with a test set."""
    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")  # [1797, 64]
    y = digits.target
    order = rng.permutation(len(x))
    probes, rest = order[:num_probes], order[num_probes:]
    half_a, half_b = rest[: len(rest) // 2], rest[len(rest) // 2:]
    permutation = rng.permutation(x.shape[1])
    transforms = {
        "half_a": (half_a, lambda images: images),
        "half_b": (half_b, lambda images: images),
        "permuted": (half_a, lambda images: images[:, permutation]),
        "inverted": (half_a, lambda images: 1.0 - images),
    }
    data = {"probes": x[probes]}
    for name, (indices, transform) in transforms.items():
        inputs = transform(x[indices])
        split = int(0.8 * len(indices))
        data[name] = (inputs[:split], y[indices[:split]])
        data[name + "_test"] = (inputs[split:], y[indices[split:]])
    return data


def _train_classifier(train, epochs, seed):
    """Train a 64-32-32-10 tanh MLP (3,466 weights) by cross-entropy.

    With one hidden layer the kernels of all networks share most of their
    structure (the output layer's Jacobian is the hidden features for every
    class): in a quick run the group means differed by at most 0.03. With the
    second hidden layer they differ by up to 0.1.
    """
    network = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(32, activation="tanh"),
        keras.layers.Dense(32, activation="tanh"),
        keras.layers.Dense(10),
    ])
    x, y = train

    def loss_fn(labels, logits):
        return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)

    _common.train(network, x, y, loss_fn, epochs=epochs, learning_rate=3e-3, batch_size=64,
                  seed=seed)
    return network


def _pair_group(task_a, task_b):
    """Return the comparison group of a pair of tasks, or None for pairs not compared."""
    shifted = [task for task in (task_a, task_b) if task in SHIFTED_TASKS]
    if not shifted:
        return GROUPS[0] if task_a == task_b else GROUPS[1]
    if len(shifted) == 2:
        return None
    return GROUPS[2] if shifted[0] == "permuted" else GROUPS[3]


def _write_outputs(output, summary, similarities):
    rows = [[group, entry["count"], f"{entry['mean']:.3f} ± {entry['std']:.3f}"]
            for group, entry in summary["groups"].items()]
    rows += [[f"test accuracy, {task}", "", f"{value:.3f}"]
             for task, value in summary["accuracy"].items()]
    table = _common.write_markdown_table(
        output / "results.md", ["pairs", "count", "Jacobian similarity (mean ± std)"], rows
    )
    print(f"Jacobian similarity on held-out digits:\n{table}")

    plt = _common.plt
    figure, axis = plt.subplots(figsize=(6, 3.8))
    positions = np.arange(len(GROUPS))
    axis.boxplot([similarities[group] for group in GROUPS], positions=positions, widths=0.5)
    jitter = np.random.default_rng(0)
    for position, group in zip(positions, GROUPS):
        values = similarities[group]
        axis.scatter(position + jitter.uniform(-0.12, 0.12, len(values)), values, s=14,
                     alpha=0.7, zorder=3)
    axis.set_xticks(positions)
    axis.set_xticklabels(GROUPS, fontsize=8)
    axis.set_ylabel("Jacobian similarity (NTK alignment)")
    axis.set_title("Pairs of digit classifiers, compared on the same images")
    figure.tight_layout()
    figure.savefig(output / "similarity.png", dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main(sys.argv[1:])

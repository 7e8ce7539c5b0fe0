"""Validation of wrapped Keras models and of the inputs passed to them."""

import collections.abc
import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_linntk import _checks


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Per-example input description of one model input.

    `shape` excludes the batch dimension, and None entries are free. `dtype` is
    None when the model does not declare it. A dataclass, not a namedtuple, so
    that `keras.tree` treats a spec as one leaf instead of a sequence.
    """

    shape: tuple
    dtype: object = None


_LOW_PRECISION = ("float16", "bfloat16")


def check_model(model):
    """Raise TypeError/ValueError unless `model` is a built Keras 3 model on TensorFlow."""
    module = type(model).__module__ or ""
    if module.startswith("tf_keras") or module.startswith("tensorflow.python.keras"):
        raise TypeError(
            "`model` is a tf_keras (Keras 2) model of type "
            f"{type(model).__name__}; tf_linntk needs a Keras 3 model. Rebuild it with "
            "`import keras` (Keras 3) instead of `tf_keras` or `tf.keras` with "
            "TF_USE_LEGACY_KERAS=1."
        )
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a built keras.Model; received an object of type "
            f"{type(model).__module__}.{type(model).__name__}."
        )
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "tf_linntk needs the TensorFlow Keras backend; the active backend is "
            f"{keras.backend.backend()!r}. Set KERAS_BACKEND=tensorflow before "
            "importing keras."
        )
    if not model.built or not model.variables:
        raise ValueError(
            f"`model` ({model.name}) is not built: it has no variables yet. Build it "
            "first, e.g. by calling it once on a batch (`model(x[:1])`), with "
            "`model.build(input_shape)`, or by starting it with `keras.Input`."
        )
    if not model.trainable_variables:
        raise ValueError(
            f"`model` ({model.name}) has no trainable variables to linearize; "
            "received a model whose variables are all non-trainable. Set "
            "`layer.trainable = True` on the layers to adapt before wrapping."
        )
    _check_precision(model)


def model_compute_dtype(model):
    """Return the float dtype the model computes in (float32 or float64).

    Layers may carry their own dtype (e.g. `Dense(..., dtype="float64")` inside a
    Sequential whose own policy is the float32 default), so the widest compute
    dtype over the model and all its layers wins.
    """
    dtypes = {
        keras.backend.standardize_dtype(layer.dtype_policy.compute_dtype)
        for layer in [model, *_all_layers(model)]
    }
    return "float64" if "float64" in dtypes else "float32"


def select_variables(model, layers):
    """Return the trainable variables of `layers` in `model.trainable_variables` order."""
    trainable = list(model.trainable_variables)
    if layers is None:
        return trainable
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)) or not layers:
        raise TypeError(
            "`layers` must be None or a non-empty list of layers or layer names; "
            f"received {layers!r}."
        )
    by_name = {layer.name: layer for layer in _all_layers(model)}
    chosen_ids = set()
    for item in layers:
        layer = _resolve_layer(item, by_name, model)
        if not layer.trainable_variables:
            raise ValueError(
                f"`layers` entry {layer.name!r} has no trainable variables to linearize."
            )
        chosen_ids.update(id(v) for v in layer.trainable_variables)
    return [v for v in trainable if id(v) in chosen_ids]


def input_specs(model):
    """Return the model's expected inputs as a structure of InputSpec, or None if unknown."""
    inputs_struct = getattr(model, "_inputs_struct", None)
    if inputs_struct is None and isinstance(model, keras.Sequential):
        # A built Sequential model keeps its single symbolic input, with its dtype
        # (e.g. int32 token ids), in `inputs`.
        inputs = getattr(model, "inputs", None)
        inputs_struct = inputs[0] if inputs else None
    if inputs_struct is not None:
        return keras.tree.map_structure(
            lambda t: InputSpec(tuple(t.shape[1:]), keras.backend.standardize_dtype(t.dtype)),
            inputs_struct,
        )
    shapes = getattr(model, "_build_shapes_dict", None)
    if not shapes or len(shapes) != 1:
        return None
    shape_struct = next(iter(shapes.values()))
    return keras.tree.map_shape_structure(
        lambda s: InputSpec(tuple(s[1:]), None), shape_struct
    )


def example_inputs(specs, compute_dtype):
    """Return one example of zeros matching `specs`, or None if a dimension is unknown."""
    if specs is None:
        return None
    leaves = keras.tree.flatten(specs) if not isinstance(specs, InputSpec) else [specs]
    if any(d is None for spec in leaves for d in spec.shape):
        return None
    return _map_specs(
        lambda spec, path: tf.zeros((1, *spec.shape), spec.dtype or compute_dtype), specs
    )


def symbolic_outputs(model):
    """Return a Functional model's symbolic outputs in their structure.

    Raises:
        ValueError: if the model has no symbolic outputs or an output dimension
            other than the batch dimension is unknown.
    """
    outputs = getattr(model, "_outputs_struct", None)
    if outputs is None:
        # A built Sequential keeps its single output tensor in the Functional it wraps.
        # Its `outputs` is a list, so predictions would become a list of one tensor.
        outputs = getattr(getattr(model, "_functional", None), "_outputs_struct", None)
    if outputs is None:
        outputs = getattr(model, "outputs", None)
    leaves = keras.tree.flatten(outputs) if outputs is not None else []
    if not leaves or any(d is None for t in leaves for d in t.shape[1:]):
        raise ValueError(
            f"Cannot infer the output shape of `model` ({model.name}) because its input "
            "shape is not fully known. Build it on a concrete shape, e.g. "
            "`model.build((None, 28, 28, 1))` or by calling it once on a batch."
        )
    return outputs


def convert_inputs(x, specs, compute_dtype, name="x"):
    """Convert `x` to tensors and check it against `specs`.

    Float inputs are cast to the declared input dtype (or the compute dtype);
    integer inputs stay integer (e.g. token ids for an Embedding).
    """
    if x is None:
        raise ValueError(f"`{name}` is required; received None.")
    if isinstance(x, tf.data.Dataset):
        raise TypeError(
            f"`{name}` must be an array, tensor or a tuple/list/dict of them here; "
            "received a tf.data.Dataset."
        )
    if _is_batch_stream(x):
        raise TypeError(
            f"`{name}` must be an array, tensor, a tuple/list/dict of them, or a "
            f"tf.data.Dataset; received a {type(x).__name__}. Wrap a generator or "
            "iterator of batches (or a keras.utils.PyDataset's batches) with "
            "`tf.data.Dataset.from_generator`."
        )
    if specs is None:
        return tf.nest.map_structure(lambda t: _convert_leaf(t, None, compute_dtype, name), x)
    _check_structure(x, specs, name)
    converted = _map_specs(
        lambda spec, leaf, path: _convert_leaf(leaf, spec, compute_dtype, path),
        specs, x, path=name,
    )
    _check_batch_sizes(converted, name)
    return converted


def _is_batch_stream(x):
    """Return whether `x` yields batches instead of containing examples (iterator, PyDataset)."""
    if isinstance(x, (collections.abc.Iterator, keras.utils.PyDataset)):
        return True
    return isinstance(x, tf.distribute.DistributedDataset)


def _check_precision(model):
    layers = [model, *_all_layers(model)]
    for layer in layers:
        compute = keras.backend.standardize_dtype(layer.dtype_policy.compute_dtype)
        if compute in _LOW_PRECISION:
            raise ValueError(
                f"`model` layer {layer.name!r} computes in {compute} (dtype policy "
                f"{layer.dtype_policy.name!r}); tf_linntk's Jacobian products need "
                "float32 or float64. Rebuild the model under "
                "`keras.config.set_dtype_policy('float32')` and load its weights."
            )


def _all_layers(model):
    return list(model._flatten_layers(include_self=False, recursive=True))


def _resolve_layer(item, by_name, model):
    if isinstance(item, str):
        if item not in by_name:
            raise ValueError(
                f"`layers` entry {item!r} is not a layer of `model` ({model.name}); "
                f"available layer names: {sorted(by_name)}."
            )
        return by_name[item]
    if isinstance(item, keras.layers.Layer):
        if all(item is not layer for layer in by_name.values()):
            raise ValueError(
                f"`layers` entry {item.name!r} is a layer object that does not belong "
                f"to `model` ({model.name})."
            )
        return item
    raise TypeError(
        f"`layers` entries must be keras layers or layer names; received {item!r} "
        f"of type {type(item).__name__}."
    )


def _map_specs(fn, specs, *others, path="x"):
    """Return fn(spec, *leaves, path) over `specs` and the matching leaves of `others`.

    `path` names the leaf for error messages, e.g. x['a'] or x[1].
    """
    if isinstance(specs, InputSpec):
        return fn(specs, *others, path)
    if isinstance(specs, dict):
        return {
            k: _map_specs(fn, specs[k], *(o[k] for o in others), path=f"{path}[{k!r}]")
            for k in specs
        }
    return type(specs)(
        _map_specs(fn, s, *(o[i] for o in others), path=f"{path}[{i}]")
        for i, s in enumerate(specs)
    )


def _check_structure(x, specs, name):
    if isinstance(specs, InputSpec):
        if isinstance(x, (dict, list, tuple)) and not _is_array_like_sequence(x):
            raise ValueError(
                f"`{name}` must be a single array or tensor for this model; received a "
                f"{type(x).__name__} of {len(x)} items."
            )
        return
    if isinstance(specs, dict):
        if not isinstance(x, dict) or set(x) != set(specs):
            got = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"`{name}` must be a dict with keys {sorted(specs)} (the model's inputs); "
                f"received {got}."
            )
        for key in specs:
            _check_structure(x[key], specs[key], f"{name}[{key!r}]")
        return
    if not isinstance(x, (list, tuple)) or len(x) != len(specs):
        got = f"{type(x).__name__} of {len(x)} items" if isinstance(x, (list, tuple)) else (
            type(x).__name__
        )
        raise ValueError(
            f"`{name}` must be a list or tuple of {len(specs)} inputs (the model's "
            f"inputs); received a {got}."
        )
    for i, spec in enumerate(specs):
        _check_structure(x[i], spec, f"{name}[{i}]")


def _is_array_like_sequence(x):
    """True for nested Python lists of numbers, which NumPy converts to one array.

    A list that holds arrays or tensors is a list of inputs, not one input.
    """
    if not isinstance(x, list) or not x:
        return False
    if any(isinstance(item, (np.ndarray, tf.Tensor)) for item in x):
        return False
    try:
        return np.asarray(x).dtype != object
    except ValueError:
        return False


def _convert_leaf(leaf, spec, compute_dtype, name):
    tensor = tf.convert_to_tensor(leaf)
    if tensor.dtype.is_floating:
        target = spec.dtype if spec is not None and spec.dtype else compute_dtype
        target = tf.as_dtype(target)
        if target.is_integer:
            raise TypeError(
                f"`{name}` must contain integers (the model's input dtype is "
                f"{target.name}); received dtype {tensor.dtype.name}."
            )
        tensor = tf.cast(tensor, target)
        _checks.check_finite(name, tensor)
    elif not tensor.dtype.is_integer and not tensor.dtype.is_bool:
        raise TypeError(
            f"`{name}` must be numeric; received dtype {tensor.dtype.name}."
        )
    if spec is None:
        return tensor
    if tensor.shape.rank != len(spec.shape) + 1:
        raise ValueError(
            f"`{name}` must have shape [N, {', '.join(map(str, spec.shape))}] "
            f"(N examples); received shape {tuple(tensor.shape)}."
        )
    for got, expected in zip(tensor.shape[1:], spec.shape):
        if expected is not None and got is not None and got != expected:
            raise ValueError(
                f"`{name}` must have per-example shape {spec.shape}; received shape "
                f"{tuple(tensor.shape)} (per-example {tuple(tensor.shape[1:])})."
            )
    return tensor


def _check_batch_sizes(x, name):
    sizes = {int(t.shape[0]) for t in tf.nest.flatten(x) if t.shape[0] is not None}
    if len(sizes) > 1:
        raise ValueError(
            f"All inputs in `{name}` must have the same number of examples; received "
            f"leading dimensions {sorted(sizes)}."
        )

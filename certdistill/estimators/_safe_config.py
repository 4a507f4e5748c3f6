"""A certdistill estimator as JSON data plus named tensors, and back (the safe format's content).

Nothing here runs code named by the data: estimator classes, parameter classes (optimisers,
losses, data loaders) and layers are looked up in fixed tables, every other value is plain JSON.

Layout of the JSON document::

    {"root": 0,                      # index of the saved estimator
     "estimators": [{"class": "DistilledStudent", "params": {...}, "fitted": {...} or null}, ...],
     "modules": [<architecture description>, ...]}

Values that JSON cannot hold are tagged objects: ``{"__tuple__": [...]}``,
``{"__ndarray__": [...], "dtype": ..., "shape": [...]}``, ``{"__numpy__": x, "dtype": ...}``,
``{"__dict__": [[key, value], ...]}``, ``{"__class__": "torch.optim.Adam"}``,
``{"__module__": i}`` (a network, its tensors under ``"modules.<i>."``),
``{"__estimator__": i}``, ``{"__frozen__": i}`` (a ``FrozenEstimator``) and
``{"__valid_split__": {...}}``. An object met twice (a student's ``teacher`` and ``teacher_``, a
``module`` parameter that is the fitted ``module_``) is stored once, and loads as one object.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import skorch.dataset
import torch
import torch.utils.data
from sklearn.frozen import FrozenEstimator
from skorch.history import History
from torch import nn

from certdistill.estimators._architecture import build_module, describe_module
from certdistill.exceptions import SafeFormatError

__all__ = ["from_config", "to_config"]


#: Where classes given as parameters may come from: namespace -> (module, required base class).
_CLASS_NAMESPACES = {
    "torch.optim": (torch.optim, torch.optim.Optimizer),
    "torch.nn": (torch.nn, nn.Module),
    "torch.utils.data": (torch.utils.data, torch.utils.data.DataLoader),
    "skorch.dataset": (skorch.dataset, torch.utils.data.Dataset),
}

#: Fitted attributes stored besides the network (``current_*_`` schedule values come too).
_FITTED_ATTRIBUTES = (
    "n_features_in_",
    "feature_names_in_",
    "classes_inferred_",
    "teacher_",
    "n_epochs_",
)

_ARRAY_KINDS = "biufUO"

_JOBLIB_HINT = (
    "The safe format holds JSON values, the supported layers and known classes (torch optimisers "
    "and losses, data loaders) only. Save this model with joblib instead (any object, but load "
    "joblib files only from sources you trust), or set the parameter to a plain value first."
)


def _estimator_classes() -> dict:
    # Imported here: the estimators' modules import the rest of the package.
    from certdistill.estimators.student import DistilledStudent
    from certdistill.estimators.teacher import CertifiedTeacher

    return {"CertifiedTeacher": CertifiedTeacher, "DistilledStudent": DistilledStudent}


def _is_fitted(estimator) -> bool:
    return bool(getattr(estimator, "initialized_", False)) and hasattr(estimator, "n_features_in_")


# ----------------------------------------------------------------------------------- saving
class _Encoder:
    def __init__(self):
        self.estimators: list = []
        self.modules: list = []
        self.module_objects: list[nn.Module] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen_estimators: dict[int, int] = {}
        self._seen_modules: dict[int, int] = {}

    def estimator(self, estimator) -> int:
        if id(estimator) in self._seen_estimators:
            return self._seen_estimators[id(estimator)]
        name = type(estimator).__name__
        if _estimator_classes().get(name) is not type(estimator):
            raise SafeFormatError(
                f"Cannot store a {type(estimator).__module__}.{type(estimator).__qualname__}: "
                "the safe format stores CertifiedTeacher and DistilledStudent (not subclasses). "
                + _JOBLIB_HINT
            )
        index = len(self.estimators)
        self._seen_estimators[id(estimator)] = index
        self.estimators.append(None)
        params = {
            key: self.value(value, f"parameter {key!r} of the {name}")
            # skorch lists private bookkeeping ("_params_to_validate") among the parameters
            for key, value in estimator.get_params(deep=False).items()
            if not key.startswith("_")
        }
        self.estimators[index] = {
            "class": name,
            "params": params,
            "fitted": self._fitted(estimator, name),
        }
        return index

    def _fitted(self, estimator, name: str) -> dict | None:
        if not _is_fitted(estimator):
            return None
        names = [attr for attr in _FITTED_ATTRIBUTES if hasattr(estimator, attr)]
        # The batch's perturbation is derived from current_eps_ and rebuilt when training goes on.
        names += sorted(
            attr
            for attr in vars(estimator)
            if attr.startswith("current_")
            and attr.endswith("_")
            and attr != "current_perturbation_"
        )
        fitted = {
            attr: self.value(getattr(estimator, attr), f"attribute {attr} of the {name}")
            for attr in names
        }
        fitted["module_"] = self.value(estimator.module_, f"the network of the {name}")
        fitted["history_"] = _history_rows(estimator.history_, name)
        return fitted

    def module(self, module: nn.Module, where: str) -> int:
        if id(module) in self._seen_modules:
            return self._seen_modules[id(module)]
        try:
            description = describe_module(module, "module")
        except SafeFormatError as error:
            raise SafeFormatError(f"Cannot store {where}: {error}") from None
        index = len(self.modules)
        self._seen_modules[id(module)] = index
        self.modules.append(description)
        self.module_objects.append(module)
        for key, tensor in module.state_dict().items():
            self.tensors[f"modules.{index}.{key}"] = tensor.detach().cpu()
        return index

    def value(self, value, where: str):
        """JSON form of one value (tagged objects for what JSON has no type for)."""
        if value is None or isinstance(value, bool | str):
            return value
        if isinstance(value, np.generic):  # before float: np.float64 is a float
            return {
                "__numpy__": _encode_array(np.asarray(value), where)["__ndarray__"],
                "dtype": value.dtype.str,
            }
        if isinstance(value, int | float):
            return value
        if isinstance(value, np.ndarray):
            return _encode_array(value, where)
        if isinstance(value, tuple):
            return {"__tuple__": [self.value(v, where) for v in value]}
        if isinstance(value, list):
            return [self.value(v, where) for v in value]
        if isinstance(value, dict) and all(isinstance(key, str) for key in value):
            return {"__dict__": [[key, self.value(v, where)] for key, v in value.items()]}
        if isinstance(value, type):
            return {"__class__": _class_name(value, where)}
        if isinstance(value, nn.Module):
            return {"__module__": self.module(value, where)}
        if isinstance(value, FrozenEstimator):
            return {"__frozen__": self.estimator(value.estimator)}
        if type(value) in _estimator_classes().values():
            return {"__estimator__": self.estimator(value)}
        if type(value) is skorch.dataset.ValidSplit:
            return {
                "__valid_split__": {
                    "cv": self.value(value.cv, where),
                    "stratified": bool(value.stratified),
                    "random_state": self.value(value.random_state, where),
                }
            }
        raise SafeFormatError(
            f"Cannot store {where}, a {type(value).__module__}.{type(value).__qualname__} "
            f"({_short_repr(value)}). {_JOBLIB_HINT}"
        )


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _encode_array(array: np.ndarray, where: str) -> dict:
    if array.dtype.kind not in _ARRAY_KINDS:
        raise SafeFormatError(f"Cannot store {where}: an array of dtype {array.dtype}.")
    items = array.tolist()
    if array.dtype.kind == "O":
        for item in array.reshape(-1).tolist():
            if not (item is None or isinstance(item, bool | int | float | str)):
                raise SafeFormatError(
                    f"Cannot store {where}: an object array holding a {type(item).__name__}. "
                    + _JOBLIB_HINT
                )
    return {"__ndarray__": items, "dtype": array.dtype.str, "shape": list(array.shape)}


def _class_name(cls: type, where: str) -> str:
    for namespace, (module, base) in _CLASS_NAMESPACES.items():
        if getattr(module, cls.__name__, None) is cls and issubclass(cls, base):
            return f"{namespace}.{cls.__name__}"
    raise SafeFormatError(
        f"Cannot store {where}, the class {cls.__module__}.{cls.__qualname__}. " + _JOBLIB_HINT
    )


def _history_rows(history, name: str) -> list:
    """The training history as JSON rows (numpy scalars become Python numbers)."""

    def plain(value):
        if isinstance(value, np.generic | np.ndarray):
            return value.tolist()
        raise TypeError(type(value).__name__)

    try:
        return json.loads(json.dumps(list(history), default=plain))
    except (TypeError, ValueError) as error:
        warnings.warn(
            f"The history of the {name} holds values JSON cannot represent ({error}); it is not "
            "saved (the loaded model has an empty history).",
            UserWarning,
            stacklevel=4,
        )
        return []


def to_config(estimator) -> tuple[dict, dict[str, torch.Tensor]]:
    """The JSON document and the tensors that stand for ``estimator``.

    Parameters
    ----------
    estimator : CertifiedTeacher or DistilledStudent

    Returns
    -------
    config : dict
        JSON-representable document.
    tensors : dict of str to Tensor
        The networks' weights and buffers, on the CPU.

    Raises
    ------
    SafeFormatError
        If a parameter, attribute or layer cannot be stored.
    """
    encoder = _Encoder()
    root = encoder.estimator(estimator)
    # The description must rebuild each network exactly: check it before anything is written.
    for description, original in zip(encoder.modules, encoder.module_objects, strict=True):
        if repr(build_module(description)) != repr(original):
            raise SafeFormatError(
                f"The safe format cannot describe this network exactly ({original!r}). "
                + _JOBLIB_HINT
            )
    return (
        {"root": root, "estimators": encoder.estimators, "modules": encoder.modules},
        encoder.tensors,
    )


# ---------------------------------------------------------------------------------- loading
class _Decoder:
    def __init__(self, config: dict, tensors: dict, device: str | None):
        self.config = config
        self.tensors = tensors
        self.device = device
        self._estimators: dict[int, object] = {}
        self._modules: dict[int, nn.Module] = {}

    def module(self, index: int) -> nn.Module:
        if index not in self._modules:
            # Built on the meta device: no memory and no random draws for weights that the
            # stored tensors replace (assign=True, which also keeps their dtypes).
            with torch.device("meta"):
                module = build_module(self.config["modules"][index])
            prefix = f"modules.{index}."
            state = {
                key[len(prefix) :]: tensor
                for key, tensor in self.tensors.items()
                if key.startswith(prefix)
            }
            try:
                module.load_state_dict(state, strict=True, assign=True)
            except RuntimeError as error:
                raise ValueError(f"the weights do not fit the architecture: {error}") from None
            if any(t.is_meta for t in [*module.parameters(), *module.buffers()]):
                raise ValueError("the weights do not cover the whole architecture")
            self._modules[index] = module
        return self._modules[index]

    def estimator(self, index: int):
        if index in self._estimators:
            return self._estimators[index]
        entry = self.config["estimators"][index]
        classes = _estimator_classes()
        if entry["class"] not in classes:
            raise ValueError(f"unknown estimator class {entry['class']!r}")
        params = {key: self.value(value) for key, value in entry["params"].items()}
        params["device"] = self._device(params.get("device", "cpu"))
        estimator = classes[entry["class"]](**params)
        self._estimators[index] = estimator
        fitted = entry["fitted"]
        if fitted is not None:
            self._restore_fitted(estimator, fitted)
        return estimator

    def _device(self, saved):
        if self.device is not None:
            return self.device
        if str(saved).startswith("cuda") and not torch.cuda.is_available():
            warnings.warn(
                f"The model was saved with device={saved!r}, but CUDA is not available: it is "
                "loaded on the CPU (device='cpu').",
                UserWarning,
                stacklevel=5,
            )
            return "cpu"
        return saved

    def _restore_fitted(self, estimator, fitted: dict) -> None:
        for attr, value in fitted.items():
            if attr not in ("module_", "history_"):
                setattr(estimator, attr, self.value(value))
        module = self.value(fitted["module_"])
        # initialize() builds the criterion, optimiser and callbacks; with module=None it also
        # builds a throw-away default network from a random draw that must not move the global
        # random state.
        with torch.random.fork_rng(devices=[]):
            estimator.initialize()
        estimator.module_ = module.to(estimator.device)
        # Derived from the parameters, validated again as ``fit`` does.
        estimator._set_perturbation(estimator.n_features_in_)
        estimator.initialize_optimizer()
        estimator.history_ = History(fitted["history_"])

    def value(self, value):
        if isinstance(value, list):
            return [self.value(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            ((tag, content),) = value.items()
            if tag == "__tuple__":
                return tuple(self.value(v) for v in content)
            if tag == "__dict__":
                return {str(key): self.value(v) for key, v in content}
            if tag == "__class__":
                return _resolve_class(content)
            if tag == "__module__":
                return self.module(int(content))
            if tag == "__estimator__":
                return self.estimator(int(content))
            if tag == "__frozen__":
                return FrozenEstimator(self.estimator(int(content)))
            if tag == "__valid_split__":
                return skorch.dataset.ValidSplit(
                    **{key: self.value(v) for key, v in content.items()}
                )
        if "__ndarray__" in value:
            return _decode_array(value["__ndarray__"], value["dtype"], value["shape"])
        if "__numpy__" in value:
            return _decode_array(value["__numpy__"], value["dtype"], []).reshape(())[()]
        raise ValueError(f"unknown value in the configuration: {value!r:.80}")


def _decode_array(items, dtype: str, shape) -> np.ndarray:
    dtype = np.dtype(dtype)
    if dtype.kind not in _ARRAY_KINDS:
        raise ValueError(f"arrays of dtype {dtype} are not allowed")
    if dtype.kind == "O":
        flat = np.asarray(items, dtype=object).reshape(-1)
        array = np.empty(flat.size, dtype=object)
        array[:] = list(flat)
        return array.reshape(shape)
    return np.asarray(items, dtype=dtype).reshape(shape)


def _resolve_class(name: str) -> type:
    namespace, _, attr = str(name).rpartition(".")
    if namespace not in _CLASS_NAMESPACES:
        raise ValueError(f"classes from {namespace!r} are not allowed (class {name!r})")
    module, base = _CLASS_NAMESPACES[namespace]
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{name!r} is not an allowed class")
    return cls


def from_config(config: dict, tensors: dict[str, torch.Tensor], *, device: str | None = None):
    """The estimator a :func:`to_config` document and its tensors stand for.

    Parameters
    ----------
    config : dict
    tensors : dict of str to Tensor
    device : str or None, default=None
        Device of every network (``None``: as saved, the CPU where CUDA is missing).

    Returns
    -------
    CertifiedTeacher or DistilledStudent

    Raises
    ------
    ValueError
        If the document is malformed or the weights do not fit it.
    """
    try:
        return _Decoder(config, tensors, device).estimator(int(config["root"]))
    except (KeyError, TypeError, IndexError, AttributeError) as error:
        raise ValueError(f"malformed model configuration: {error!r}") from None

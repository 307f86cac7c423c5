"""``qbackend.from_pretrained``: a Hugging Face directory in, a quantized model out, never the float model.

Three kinds of directory, told apart by config.json's ``quantization_config``:

* none (a float checkpoint): each eligible linear weight is quantized as it is read (the module form
  ``quantize_`` makes, `QuantizedLinear`) and its float copy dropped; everything else is kept in
  its stored dtype;
* ``quant_method: "qbackend"`` (:func:`qbackend.save_pretrained`): the layers are built from their
  format records (the checkpoint format of :mod:`qbackend.serialization`), nothing re-quantized;
* ``quant_method: "bitsandbytes"`` with ``load_in_4bit`` (transformers' serialization): the codes
  and constants are relabelled (:mod:`qbackend.formats.bnb_interop`), nothing re-quantized.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import formats
from ..core import registry
from ..core.config import ConfigError, QuantConfig
from ..formats import FormatError, LayerRecord
from ..formats.bnb_interop import from_bnb_state_dict
from ..kernels import UnsupportedWeight, prepare_weight
from ..kernels.compute_policy import ComputeUnavailable
from ..passes.modules import is_conv1d, linear_modules
from ..passes.select_layers import decide_layer
from ..serialization import FORMAT_VERSION, CheckpointError
from ..serialization.assign import check_materialised, swap_module
from ..serialization.bnb import bnb_prefixes
from ..serialization.layers import build_layer
from ..serialization.manifest import DIGEST_KEY, check_tensor, parse_manifest, read_records
from ..serialization.records import record_from_json
from ..workflows.weight_only import QuantizedLinear
from . import stream
from .directory import ShardSet, read_config, resolve_directory
from .skeleton import build_skeleton

log = logging.getLogger("qbackend")

QUANT_METHOD = "qbackend"


def from_pretrained(
    model_dir_or_id: str | os.PathLike, options: Any = None, *, model_class: Any = None, compute: str | None = None,
    progress: bool = True,
) -> nn.Module:  # fmt: skip
    """Load a Hugging Face model directory as a quantized model, on the CPU, in eval mode.

    model_dir_or_id: a directory (config.json + ``*.safetensors``, sharded with an index json or
        not), or a Hub id already in the local Hugging Face cache (nothing is downloaded).
    options: for a float checkpoint, the weight-only quantization (a preset name, a dict of
        ``QuantConfig`` fields or a ``QuantConfig``; default nf4). A directory quantized already
        (qbackend or bitsandbytes 4-bit) loads as stored: ``options`` must then be None.
    model_class: the transformers class to build (default ``AutoModelForCausalLM``; any Auto class
        or model class with ``from_config``).
    compute: the quantized layers' arithmetic option (``QuantConfig.compute``); None: the config's.
    progress: show a progress bar over the bytes read.

    Peak memory: the quantized model, plus the one float tensor being quantized (and the quantizer's
    temporaries for it): shards are read one tensor at a time, never mapped whole.
    Raises `CheckpointError` naming the file (and tensor) for a missing shard, a truncated file, a
    shard that does not match config.json, or a quantization_config qbackend does not read.
    """
    directory = resolve_directory(model_dir_or_id)
    cfg = read_config(directory)
    kind = _quantization_kind(cfg, directory / "config.json")
    if kind != "float" and options is not None:
        raise CheckpointError(
            f"{directory}: is quantized already ({kind}); it loads as stored: pass options=None "
            "(re-quantizing needs the float checkpoint)"
        )
    shards = ShardSet(directory)
    model = build_skeleton(model_class, cfg, directory / "config.json")
    if kind == "float":
        config = _weight_only_config(options)
        plan = _plan_float(model, shards, config)
        saved_compute = config.compute
    elif kind == QUANT_METHOD:
        plan, config = _plan_qbackend(model, shards)
        saved_compute = config.compute if config is not None else None
    else:
        plan, config, saved_compute = _plan_bnb(model, shards), None, None
    stream.run(model, shards, plan, progress=progress, desc=f"loading {directory.name}")
    check_materialised(model, str(directory))
    _load_generation_config(model, directory)
    _set_compute(model, compute if compute is not None else saved_compute, directory)
    model.qbackend_config = config  # what save_pretrained records
    return model.eval()


# ---- which kind of directory ---------------------------------------------------------------------


def _quantization_kind(cfg: dict[str, Any], path: Path) -> str:
    """ "float", "qbackend" or "bitsandbytes"; `CheckpointError` for any other tool's or version's."""
    qc = cfg.get("quantization_config")
    if qc is None:
        return "float"
    if not isinstance(qc, dict):
        raise CheckpointError(f"{path}: quantization_config is {type(qc).__name__}; expected an object")
    method = qc.get("quant_method")
    if method == QUANT_METHOD:
        version = qc.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise CheckpointError(f"{path}: qbackend quantization_config has no integer 'format_version'")
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"{path}: written by qbackend {str(qc.get('version', '?'))[:40]} in checkpoint format {version}; "
                f"this qbackend reads format {FORMAT_VERSION}: upgrade qbackend"
            )
        return QUANT_METHOD
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return "bitsandbytes"
        raise CheckpointError(f"{path}: a bitsandbytes 8-bit (LLM.int8) checkpoint; qbackend reads its 4-bit ones only")
    name = str(method)[:40] if method is not None else "an unnamed tool"
    raise CheckpointError(
        f"{path}: quantization_config is from {name!r}, which qbackend does not read; it reads float "
        "checkpoints, its own ('qbackend') and bitsandbytes 4-bit ones"
    )


def _weight_only_config(options: Any) -> QuantConfig:
    try:
        config = QuantConfig.from_options(options)
    except (ConfigError, FormatError) as e:
        raise ConfigError(f"from_pretrained: {e}") from None
    workflow = registry.workflow_for(config)
    method = getattr(config, "method", None)
    if workflow.name != "weight_only" or (method is not None and getattr(method, "calibrated", False)):
        raise ConfigError(
            "from_pretrained quantizes while loading with weight-only round-to-nearest configs (nf4, fp4, int4, "
            "int8); for this one load the float model and call qbackend.quantize_"
        )
    return config


# ---- float checkpoints: quantize as read -----------------------------------------------------------


def _aliases(model: nn.Module) -> list[list[str]]:
    """The names of each tensor of the state dict (tied weights: several names)."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def _stored_names(model: nn.Module, shards: ShardSet, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """``{model tensor name: stored name}`` over the state dict (but names under ``skip``); checks that
    each tensor is stored once, with the model's shape, and that the shards hold nothing else."""
    state = model.state_dict(keep_vars=True)
    out: dict[str, str] = {}
    where = shards.index_path or shards.directory
    for names in _aliases(model):
        names = [n for n in names if not n.startswith(skip)]
        if not names:
            continue
        key = next((n for n in names if n in shards.tensors), None)
        if key is None:
            raise CheckpointError(
                f"{where}: tensor {names[0]!r} is missing from the shards, but the model built from config.json "
                "has it; is a shard missing, or is config.json (or model_class) not this checkpoint's?"
            )
        info, want = shards.tensors[key], tuple(state[names[0]].shape)
        if info.shape != want:
            raise CheckpointError(
                f"{info.file}: tensor {key!r} has shape {list(info.shape)}, but the model built from config.json "
                f"has {list(want)}; the shard does not match config.json"
            )
        out.update(dict.fromkeys(names, key))
    non_persistent = {n for n, _ in model.named_buffers()} - set(state)
    known = set(out.values()) | non_persistent
    extra = [k for k in shards.tensors if k not in known and not k.startswith(skip)]
    if extra:
        f = shards.tensors[extra[0]].file
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise CheckpointError(
            f"{f}: holds tensor {extra[0]!r}{more}, which the model built from config.json does not have; "
            "the shard does not match config.json (or model_class)"
        )
    return out


def _kind(model: nn.Module, name: str) -> str:
    owner, _, attr = name.rpartition(".")
    return "buffer" if attr in model.get_submodule(owner)._buffers else "param"


def _plan_float(model: nn.Module, shards: ShardSet, config: QuantConfig) -> stream.Plan:
    stored = _stored_names(model, shards)
    eligible: dict[str, tuple[Any, bool]] = {}
    for name, _parent, _attr, mod in linear_modules(model):
        scheme, _why = decide_layer(name, mod.weight.numel(), config)
        if scheme is not None and f"{name}.weight" in stored:
            eligible[name] = (scheme, is_conv1d(mod))
    plan = stream.Plan()
    kernel_weights: dict[tuple[str, bool], Any] = {}  # tied layers share one set of quantized tensors
    for name, key in stored.items():
        owner, _, attr = name.rpartition(".")
        if owner in eligible and attr in ("weight", "bias"):
            continue
        plan.add_assign(key, name, _kind(model, name))
    for layer, (scheme, transposed) in eligible.items():
        wkey, bkey = stored[f"{layer}.weight"], stored.get(f"{layer}.bias")
        keys = frozenset({wkey} | ({bkey} if bkey else set()))
        build = _quantizing_build(model, layer, wkey, bkey, scheme, transposed, config.compute, kernel_weights,
                                  str(shards.tensors[wkey].file))  # fmt: skip
        plan.groups.append(stream.Group(layer, keys, build))
    return plan


def _quantizing_build(
    model: nn.Module, layer: str, wkey: str, bkey: str | None, scheme: Any, transposed: bool, compute: str,
    kernel_weights: dict, path: str,
) -> Any:  # fmt: skip
    def build(got: dict[str, torch.Tensor]) -> None:
        bias = got.get(bkey) if bkey else None
        kw = kernel_weights.get((wkey, transposed))
        if kw is None:
            w = got[wkey]
            w = w.t().contiguous() if transposed else w
            try:
                kw = prepare_weight(formats.quantize(w, scheme, name=layer))
            except UnsupportedWeight as e:  # stays float, as quantize_ leaves it
                log.info("qbackend: %s stays float (%s)", layer, e.reason)
                _assign_float(model, layer, got[wkey], bias, path)
                return
            except FormatError as e:
                raise CheckpointError(f"{path}: cannot quantize {wkey!r}: {e}") from None
            kernel_weights[(wkey, transposed)] = kw
        swap_module(model, layer, QuantizedLinear(kw, bias, scheme, compute), path)

    return build


def _assign_float(model: nn.Module, layer: str, weight: torch.Tensor, bias: torch.Tensor | None, path: str) -> None:
    from ..serialization.assign import set_tensor

    set_tensor(model, f"{layer}.weight", weight, "param", path)
    if bias is not None:
        set_tensor(model, f"{layer}.bias", bias, "param", path)


# ---- qbackend directories: build from the records --------------------------------------------------


def _plan_qbackend(model: nn.Module, shards: ShardSet) -> tuple[stream.Plan, QuantConfig | None]:
    first = shards.files[0]
    manifest = parse_manifest(shards.metadata[first], str(first))
    for f, meta in shards.metadata.items():
        if meta.get(DIGEST_KEY) != shards.metadata[first].get(DIGEST_KEY):
            raise CheckpointError(f"{f}: belongs to another save than {first.name} (their manifests differ)")
    entries = manifest["tensors"]
    extra = [k for k in shards.tensors if k not in entries]
    if extra:
        raise CheckpointError(f"{shards.tensors[extra[0]].file}: holds tensor {extra[0]!r}, which the manifest "
                              "does not list; the directory mixes files of different saves")  # fmt: skip
    plan = stream.Plan(check=lambda key, t: check_tensor(key, t, entries[key], str(shards.tensors[key].file)))
    for key, info in entries.items():
        for name, kind in info["uses"]:
            plan.add_assign(key, name, kind)
    kernel_weights: dict = {}  # tied layers share one set of kernel tensors
    for layer, js in manifest["layers"].items():
        plan.groups.append(
            stream.Group(layer, _record_keys(layer, js, first), _record_build(model, layer, js, kernel_weights, first))
        )
    config = None
    if isinstance(manifest.get("config"), dict):
        try:
            config = QuantConfig.from_dict(manifest["config"])
        except (ConfigError, FormatError) as e:
            raise CheckpointError(f"{first}: corrupt config record: {e}") from None
    return plan, config


def _record_keys(layer: str, js: dict[str, Any], path: Path) -> frozenset[str]:
    """The stored tensors a layer record names (its weight's, its bias, its kind's)."""
    try:
        names = [*js["weight"]["tensors"].values(), *js.get("tensors", {}).values()]
        if js.get("bias") is not None:
            names.append(js["bias"])
    except (KeyError, TypeError, AttributeError) as e:
        why = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: corrupt record for quantized layer {layer!r} ({why})") from None
    if not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{path}: corrupt record for quantized layer {layer!r} (a tensor name is no string)")
    return frozenset(names)


def _record_build(model: nn.Module, layer: str, js: dict[str, Any], kernel_weights: dict, path: Path) -> Any:
    def build(got: dict[str, torch.Tensor]) -> None:
        rec = read_records({layer: js}, lambda n, j: record_from_json(n, j, got, str(path)), str(path))[layer]
        swap_module(model, layer, build_layer(layer, rec, kernel_weights, str(path)), str(path), rec.weight.shape)

    return build


# ---- bitsandbytes 4-bit directories -----------------------------------------------------------------


def _plan_bnb(model: nn.Module, shards: ShardSet) -> stream.Plan:
    prefixes = bnb_prefixes(dict.fromkeys(shards.tensors))
    if not prefixes:
        raise CheckpointError(f"{shards.directory}: config.json says bitsandbytes 4-bit, but no shard holds a "
                              "4-bit weight (no '.quant_state.bitsandbytes__nf4' entries)")  # fmt: skip
    plan = stream.Plan()
    layer_keys: set[str] = set()
    kernel_weights: dict = {}
    for prefix in prefixes:
        keys = {k for k in shards.tensors if k == prefix + "weight" or k.startswith(prefix + "weight.")}
        if prefix + "bias" in shards.tensors:
            keys.add(prefix + "bias")
        layer_keys |= keys
        layer = prefix.rstrip(".")
        path = (
            str(shards.tensors[prefix + "weight"].file)
            if prefix + "weight" in shards.tensors
            else str(shards.directory)
        )
        plan.groups.append(stream.Group(layer, frozenset(keys), _bnb_build(model, layer, prefix, kernel_weights,
                                                                           path)))  # fmt: skip
    stored = _stored_names(model, shards, skip=tuple(prefixes))
    for name, key in stored.items():
        if key not in layer_keys:
            plan.add_assign(key, name, _kind(model, name))
    return plan


def _bnb_build(model: nn.Module, layer: str, prefix: str, kernel_weights: dict, path: str) -> Any:
    def build(got: dict[str, torch.Tensor]) -> None:
        try:
            qw = from_bnb_state_dict(got, prefix)
        except FormatError as e:
            raise CheckpointError(f"{path}: bitsandbytes layer {layer!r}: {e}") from None
        rec = LayerRecord("weight_only", qw, got.get(prefix + "bias"))
        swap_module(model, layer, build_layer(layer, rec, kernel_weights, path), path, rec.weight.shape)

    return build


# ---- after loading ----------------------------------------------------------------------------------


def _load_generation_config(model: nn.Module, directory: Path) -> None:
    """The directory's generation_config.json, as transformers' from_pretrained reads it."""
    path = directory / "generation_config.json"
    if not path.exists() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from None


def _set_compute(model: nn.Module, compute: str | None, directory: Path) -> None:
    """Give the quantized layers ``compute``; one this machine cannot run becomes "auto" (with a warning)."""
    if compute is None:
        return
    for m in model.modules():
        if callable(getattr(m, "set_compute", None)):
            try:
                m.set_compute(compute)
            except ComputeUnavailable as e:
                log.warning("qbackend: %s: asks for %s; using compute='auto'", directory, e)
                compute = "auto"
                m.set_compute(compute)

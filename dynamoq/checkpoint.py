"""Save and load dynamoq-quantized models: safetensors for tensors, JSON for everything else.

Nothing is ever unpickled. A packed weight (DynaMoExperts / SwitchableLinear, any torchao tensor
subclass of dynamoq) is stored as its tensor parts, generically over `tensor_data_names` and
`optional_tensor_data_names`, under torchao's flattened naming:

    model.layers.0.mlp.experts.gate_up_proj  ->  model.layers.0.mlp.experts._gate_up_proj_scale
                                                  model.layers.0.mlp.experts._gate_up_proj_zero
                                                  model.layers.0.mlp.experts._gate_up_proj_q4 ...
    model.layers.0.mlp.shared_expert.up_proj.weight  ->  ...shared_expert.up_proj._weight_q8 ...

The leaf is prefixed and suffixed, so transformers' key conversions (which end on a name boundary,
`gate_up_proj(?!\\w)`) never split or merge packed parts, while renames of the module path (e.g.
mixtral's `mlp` <-> `block_sparse_moe`) apply to them as to every other key.

A checkpoint directory holds:
  config.json        transformers' config; `quantization_config` has quant_method "dynamoq", the
                     format version and, per packed weight, its type, logical shape, attributes
                     (expert_bits, group_size, transposed, dtype, ...) and the dtype/shape of every part
                     (saved by save_pretrained only; `dynamoq.save` of other models has no config.json)
  *.safetensors      the tensors (sharded with an index as transformers does)
  dynamoq.json       the manifest, written last: format version, sha256 and size of every file, the
                     dtype/shape/file of every tensor, and a copy of quantization_config; it carries
                     its own sha256, so any changed byte anywhere is found before anything is loaded.

Saving is atomic: everything is written into a temporary sibling directory, which then replaces the
target in one rename (renameat2 RENAME_EXCHANGE on Linux; elsewhere two renames, and a later save or
`dynamoq.load` puts the previous checkpoint back if a crash fell between them).

With dynamoq imported, transformers knows quant_method "dynamoq" (DynamoqConfig + DynamoqHfQuantizer)
and `PreTrainedModel.save_pretrained` of a model holding packed weights goes through `_save_pretrained`.
Without dynamoq, the `transformers_weights` entry of config.json makes transformers stop with a
message that names the package.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
from typing import Any

import torch
from torch import nn

from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps, WeightConverter, WeightRenaming, rename_source_key
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING,
                                          register_quantization_config, register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import adapters, packing
from .config import DynaMoConfig
from .tensors import SwitchableLinear, _PackedWeight

logger = logging.getLogger(__name__)

QUANT_METHOD = "dynamoq"
FORMAT_VERSION = 2          # 2: packing.py's chunked byte layout (1 packed consecutive codes per byte)
SUPPORTED_FORMAT_VERSIONS = (2,)
MANIFEST_NAME = "dynamoq.json"
CONFIG_NAME = "config.json"
INSTALL_HINT = ("this checkpoint holds dynamoq-quantized weights: install dynamoq (`pip install dynamoq`) "
                "and `import dynamoq` before from_pretrained")
VERIFY_ENV = "DYNAMOQ_VERIFY"          # "0": skip the sha256 of every file (structure is always checked)
_TMP_TAG, _OLD_TAG = ".dynamoq-tmp-", ".dynamoq-old-"


class CheckpointError(ValueError):
    """A dynamoq checkpoint that cannot be written or read back exactly as it was saved."""


def _version() -> str:
    from . import __version__
    return __version__


# ---- dtypes ---------------------------------------------------------------------------------------
_ST_DTYPES = {  # torch dtype -> safetensors header string
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


def _torch_dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _TORCH_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {name!r}")
    return _TORCH_DTYPES[name]


# ---- packed tensors <-> parts + JSON metadata ---------------------------------------------------------
def _packed_classes() -> dict[str, type]:
    """Every dynamoq tensor subclass, by name (the only types a checkpoint may name)."""
    out, todo = {}, [_PackedWeight]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            out[sub.__name__] = sub
            todo.append(sub)
    return out


def part_key(fqn: str, part: str) -> str:
    """Checkpoint key of one tensor part of the packed weight `fqn` (torchao's flattened naming)."""
    mod, _, leaf = fqn.rpartition(".")
    return f"{mod}._{leaf}_{part}" if mod else f"_{leaf}_{part}"


def _encode(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"torch_dtype": _dtype_name(v)}
    if isinstance(v, (tuple, list)):
        return [_encode(x, where) for x in v]
    if isinstance(v, dict) and all(isinstance(k, str) for k in v):
        return {"dict": {k: _encode(x, where) for k, x in v.items()}}
    raise CheckpointError(f"{where}: cannot store an attribute of type {type(v).__name__} in JSON")


def _decode(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return tuple(_decode(x, where) for x in v)
    if isinstance(v, dict) and set(v) == {"torch_dtype"}:
        return _torch_dtype(v["torch_dtype"], where)
    if isinstance(v, dict) and set(v) == {"dict"} and isinstance(v["dict"], dict):
        return {k: _decode(x, where) for k, x in v["dict"].items()}
    raise CheckpointError(f"{where}: malformed attribute value {v!r}")


def _attribute_names(cls) -> list[str]:
    return list(cls.tensor_attribute_names) + list(getattr(cls, "optional_tensor_attribute_names", []))


def _part_names(cls) -> list[str]:
    return list(cls.tensor_data_names) + list(getattr(cls, "optional_tensor_data_names", []))


def describe_tensor(fqn: str, t: _PackedWeight) -> dict:
    """JSON metadata of one packed weight: enough to check and rebuild it from its parts."""
    parts, attrs = t.__tensor_flatten__()
    return {
        "type": type(t).__name__,
        "shape": list(t.shape),
        "attributes": {k: _encode(attrs[k], f"{fqn}.{k}") for k in _attribute_names(type(t))},
        "parts": {p: {"dtype": _dtype_name(getattr(t, p).dtype), "shape": list(getattr(t, p).shape)}
                  for p in parts},
    }


def flatten_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(plain tensors under checkpoint keys, {packed weight name: metadata})."""
    flat, modules = {}, {}
    for name, t in state_dict.items():
        if isinstance(t, _PackedWeight):
            modules[name] = describe_tensor(name, t)
            for p in modules[name]["parts"]:
                flat[part_key(name, p)] = getattr(t, p).detach()
        elif isinstance(t, torch.Tensor) and type(t) is not torch.Tensor and not isinstance(t, nn.Parameter):
            raise CheckpointError(f"{name}: cannot save a tensor of type {type(t).__name__}")
        else:
            flat[name] = t.detach() if isinstance(t, torch.Tensor) else t
    clash = [k for k in modules for p in modules[k]["parts"] if part_key(k, p) in state_dict]
    if clash:
        raise CheckpointError(f"the state dict already holds a tensor named like a packed part of {clash[0]}")
    return flat, modules


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        raise CheckpointError(f"{where}: malformed shape {v!r}")
    return tuple(v)


def expected_parts(fqn: str, meta: Any) -> tuple[type, dict, dict[str, tuple[tuple[int, ...], torch.dtype]]]:
    """Check the metadata of one packed weight; -> (class, decoded attributes, {part: (shape, dtype)}).

    The shapes of scale, zero and codes follow from the logical shape and the attributes
    (codes of b bits: [experts with b bits, N, K * b / 8]); other parts (e.g. a switching cache)
    are checked against the shape and dtype the metadata records."""
    if not isinstance(meta, dict) or set(meta) != {"type", "shape", "attributes", "parts"}:
        raise CheckpointError(f"{fqn}: malformed metadata in quantization_config")
    cls = _packed_classes().get(meta["type"])
    if cls is None:
        raise CheckpointError(f"{fqn}: unknown tensor type {meta['type']!r} (this dynamoq knows "
                              f"{sorted(_packed_classes())})")
    shape = _shape(meta["shape"], f"{fqn} shape")
    if not isinstance(meta["attributes"], dict) or not isinstance(meta["parts"], dict):
        raise CheckpointError(f"{fqn}: malformed metadata in quantization_config")
    names = _attribute_names(cls)
    if set(meta["attributes"]) != set(names):
        raise CheckpointError(f"{fqn}: attributes {sorted(meta['attributes'])} do not match {cls.__name__}'s "
                              f"{sorted(names)}")
    attrs = {k: _decode(meta["attributes"][k], f"{fqn}.{k}") for k in names}
    recorded = {}
    for p, pm in meta["parts"].items():
        if not isinstance(pm, dict) or set(pm) != {"dtype", "shape"}:
            raise CheckpointError(f"{fqn}: malformed metadata of part {p!r}")
        recorded[p] = (_shape(pm["shape"], f"{part_key(fqn, p)} shape"),
                       _torch_dtype(pm["dtype"], part_key(fqn, p)))
    unknown = set(recorded) - set(_part_names(cls))
    if unknown:
        raise CheckpointError(f"{fqn}: {cls.__name__} has no tensor part {sorted(unknown)[0]!r}")
    expected = dict(recorded)
    if issubclass(cls, _PackedWeight):
        expected.update(_packed_layout(fqn, cls, shape, attrs, recorded))
    for p in cls.tensor_data_names:
        if p not in expected:
            raise CheckpointError(f"{fqn}: the metadata lists no tensor {part_key(fqn, p)}")
    for p, (s, d) in recorded.items():
        if expected[p] != (s, d):
            raise CheckpointError(f"{part_key(fqn, p)}: metadata says {list(s)} {_dtype_name(d)} but "
                                  f"{fqn} ({cls.__name__} {list(shape)}, attributes {attrs}) needs "
                                  f"{list(expected[p][0])} {_dtype_name(expected[p][1])}")
    return cls, attrs, expected


def _packed_layout(fqn, cls, shape, attrs, recorded) -> dict:
    bits, g, transposed, dtype = (attrs["expert_bits"], attrs["group_size"], attrs["transposed"], attrs["dtype"])
    ok = (isinstance(bits, tuple) and bits and all(isinstance(b, int) and b in packing.BITS for b in bits)
          and isinstance(g, int) and not isinstance(g, bool) and g > 0 and g % 8 == 0
          and isinstance(transposed, bool) and isinstance(dtype, torch.dtype) and dtype.is_floating_point)
    if not ok:
        raise CheckpointError(f"{fqn}: invalid attributes {attrs} (bits must be in {packing.BITS}, group_size a "
                              f"positive multiple of 8, dtype a floating dtype)")
    if len(shape) != (3 if cls._is_3d else 2):
        raise CheckpointError(f"{fqn}: {cls.__name__} cannot have logical shape {list(shape)}")
    if cls._is_3d:
        e, a, b = shape
        n, k = (b, a) if transposed else (a, b)
    else:
        (n, k), e = shape, 1
    if len(bits) != e:
        raise CheckpointError(f"{fqn}: expert_bits lists {len(bits)} bit-widths for {e} experts")
    if k % g:
        raise CheckpointError(f"{fqn}: input dimension {k} is not divisible by group_size {g}")
    out = {"scale": ((e, n, k // g), packing.SCALE_DTYPE), "zero": ((e, n, k // g), torch.uint8)}
    for b in sorted(set(bits)):
        out[f"q{b}"] = ((bits.count(b), n, k * b // 8), torch.uint8)
    stray = [p for p in recorded if re.fullmatch(r"q\d+", p) and p not in out]
    if stray:
        raise CheckpointError(f"{part_key(fqn, stray[0])}: expert_bits {bits} of {fqn} have no "
                              f"{stray[0][1:]}-bit experts, yet the checkpoint holds their codes")
    missing = [p for p in out if p not in recorded]
    if missing:
        raise CheckpointError(f"{fqn}: the metadata lists no tensor {part_key(fqn, missing[0])} "
                              f"(needed by expert_bits {bits})")
    return out


def check_part(key: str, fqn: str, part: str, shape, dtype: torch.dtype | str, expected: dict) -> None:
    """One tensor as found in a checkpoint against what the metadata of `fqn` requires."""
    want_shape, want_dtype = expected[part]
    got_dtype = dtype if isinstance(dtype, str) else _ST_DTYPES.get(dtype, str(dtype))
    if tuple(shape) != want_shape or got_dtype != _ST_DTYPES[want_dtype]:
        raise CheckpointError(
            f"{key}: found {list(shape)} {got_dtype}, but {fqn} needs {list(want_shape)} "
            f"{_ST_DTYPES[want_dtype]} (the bit-widths, group size and shape in quantization_config do not "
            f"match the packed tensors)")


def build_tensor(fqn: str, meta: dict, parts: dict[str, torch.Tensor], dtype: torch.dtype | None = None):
    """The packed weight `fqn` from its parts, after checking every part against its metadata."""
    cls, attrs, expected = expected_parts(fqn, meta)
    extra = set(parts) - set(expected)
    if extra:
        raise CheckpointError(f"unexpected tensor {part_key(fqn, sorted(extra)[0])}")
    for p in expected:
        if p not in parts:
            raise CheckpointError(f"missing tensor {part_key(fqn, p)}")
        check_part(part_key(fqn, p), fqn, p, parts[p].shape, parts[p].dtype, expected)
    if dtype is not None and "dtype" in attrs:
        attrs["dtype"] = dtype
    t = cls.__tensor_unflatten__(dict(parts), attrs, None, None)
    if tuple(t.shape) != tuple(meta["shape"]):
        raise CheckpointError(f"{fqn}: rebuilt shape {list(t.shape)} differs from {meta['shape']}")
    return t


class _PartIndex:
    """Maps checkpoint keys (in the model's own naming) back to (packed weight, part)."""

    def __init__(self, modules: dict[str, dict]):
        self.leaves: dict[str, list[str]] = {}
        for fqn in modules:
            mod, _, leaf = fqn.rpartition(".")
            self.leaves.setdefault(mod, []).append(leaf)
        for v in self.leaves.values():
            v.sort(key=len, reverse=True)

    def parse(self, key: str) -> tuple[str, str] | None:
        mod, _, last = key.rpartition(".")
        if not last.startswith("_"):
            return None
        for leaf in self.leaves.get(mod, ()):
            if last.startswith(f"_{leaf}_") and len(last) > len(leaf) + 2:
                return (f"{mod}.{leaf}" if mod else leaf), last[len(leaf) + 2:]
        return None


def _check_parts_present(found: dict[str, dict[str, tuple]], modules: dict[str, dict]) -> dict:
    """found: {fqn: {part: (key, shape, dtype)}} from a checkpoint's headers; every part of every packed
    weight must be there, with the right shape and dtype, and nothing else."""
    layouts = {}
    for fqn, meta in modules.items():
        _, _, expected = expected_parts(fqn, meta)
        layouts[fqn] = expected
        got = found.get(fqn, {})
        for p in expected:
            if p not in got:
                raise CheckpointError(f"missing tensor {part_key(fqn, p)} (part {p!r} of {fqn})")
        for p, (key, shape, dtype) in got.items():
            if p not in expected:
                bits = meta["attributes"].get("expert_bits")
                if re.fullmatch(r"q\d+", p) and isinstance(bits, list):
                    raise CheckpointError(f"unexpected tensor {key}: expert_bits {bits} of {fqn} have no "
                                          f"{p[1:]}-bit experts")
                raise CheckpointError(f"unexpected tensor {key}: {fqn} has no part {p!r}")
            check_part(key, fqn, p, shape, dtype, expected)
    return layouts


# ---- what a quantized model is, as JSON --------------------------------------------------------------
def _unique(values):
    values = set(values)
    return values.pop() if len(values) == 1 else None


def quantization_config_dict(model: nn.Module, modules: dict[str, dict]) -> dict:
    """`quantization_config` of a quantized model: format, per-weight metadata, and the DynaMoConfig
    fields that re-create the same layout from the float model."""
    expert_bits, shared, dense = {}, [], []
    try:
        blocks = adapters.moe_blocks(model)
    except adapters.UnsupportedModelError:
        blocks = []
    for block in blocks:
        if block.adapter.fused:
            w = getattr(block.experts, block.projections[0].name)
            if isinstance(w, _PackedWeight):
                expert_bits[str(block.layer)] = list(w.expert_bits)
        else:
            per = [next((p.bits for p in e.parameters() if isinstance(p, SwitchableLinear)), None)
                   for e in block.experts]
            if all(b is not None for b in per):
                expert_bits[str(block.layer)] = per
        for s in block.shared.values():
            shared += [p.bits for p in s.parameters() if isinstance(p, SwitchableLinear)]
    for mlp in adapters.dense_mlps(model).values():
        dense += [p.bits for p in mlp.parameters() if isinstance(p, SwitchableLinear)]
    attention = [p.bits for a in adapters.attentions(model).values() for p in a.parameters()
                 if isinstance(p, SwitchableLinear)]
    head = getattr(adapters.output_head(model), "weight", None)
    group = _unique(m["attributes"]["group_size"] for m in modules.values() if "group_size" in m["attributes"])
    # the experts' own config (the text config of a composite model) says which implementation runs them
    configs = [getattr(b.experts, "config", None) for b in blocks if b.adapter.fused] + [getattr(model, "config", None)]
    impl = next((c._experts_implementation for c in configs if getattr(c, "_experts_implementation", None)), None)
    cache = {fqn: sorted(set(m["parts"]) - {"scale", "zero"} - {p for p in m["parts"] if re.fullmatch(r"q\d+", p)})
             for fqn, m in modules.items()}
    cache = {k: v for k, v in cache.items() if v}
    # the model dtype transformers writes to config.json; from_pretrained(dtype=...) other than it re-types
    # the packed weights too (their parts stay as stored)
    dtype = getattr(model, "dtype", None) if _is_transformers_model(model) else None
    float_dtypes = [dtype] if isinstance(dtype, torch.dtype) else [p.dtype for p in model.parameters()
                                                                   if p.is_floating_point()]
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "dynamoq_version": _version(),
        "config": {"expert_bits": expert_bits, "group_size": group, "shared_bits": _unique(shared),
                   "dense_bits": _unique(dense), "attention_bits": _unique(attention),
                   "lm_head_bits": head.bits if isinstance(head, SwitchableLinear) else None,
                   "experts_implementation": impl},
        "expert_bits": expert_bits,
        "group_size": group,
        "experts_implementation": impl,
        "dtype": _dtype_name(float_dtypes[0]) if float_dtypes else None,
        "switching_cache": cache or None,
        "modules": modules,
    }


def _check_version(v: Any, where) -> None:
    if v in SUPPORTED_FORMAT_VERSIONS and not isinstance(v, bool):
        return
    if isinstance(v, int) and not isinstance(v, bool) and 0 < v < FORMAT_VERSION:
        raise CheckpointError(f"{where}: written by an older dynamoq (format {v}) whose packed bit layout this "
                              f"dynamoq ({_version()}) does not read; quantize the original model again")
    raise CheckpointError(f"{where}: unknown dynamoq format version {v!r}; this dynamoq ({_version()}) reads "
                          f"format {', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))} (a newer dynamoq may read it)")


def check_format(qc: Any, where: str) -> None:
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config is not a JSON object")
    if qc.get("quant_method") != QUANT_METHOD:
        raise CheckpointError(f"{where}: quant_method is {qc.get('quant_method')!r}, not {QUANT_METHOD!r}")
    _check_version(qc.get("format_version"), where)
    if not isinstance(qc.get("modules"), dict):
        raise CheckpointError(f"{where}: quantization_config has no 'modules' table")


# ---- manifest and integrity ---------------------------------------------------------------------------
def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_headers(files: list[str]) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """{key: (file name, safetensors dtype, shape)} from the headers only (no tensor data is read)."""
    from safetensors import safe_open

    out = {}
    for path in files:
        name = os.path.basename(path)
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    s = f.get_slice(k)
                    if k in out:
                        raise CheckpointError(f"tensor {k} is stored twice ({out[k][0]} and {name})")
                    out[k] = (name, s.get_dtype(), tuple(s.get_shape()))
        except CheckpointError:
            raise
        except Exception as e:  # safetensors' own error for a damaged header, or an unreadable file
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
    return out


def _tensor_table(headers) -> dict:
    return {k: {"file": f, "dtype": d, "shape": list(s)} for k, (f, d, s) in sorted(headers.items())}


def write_manifest(directory: str, quantization_config: dict, extra: dict | None = None) -> dict:
    files = {}
    for root, _, names in os.walk(directory):
        for n in names:
            path = os.path.join(root, n)
            rel = os.path.relpath(path, directory).replace(os.sep, "/")
            if rel != MANIFEST_NAME:
                files[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256_file(path)}
    weights = sorted(os.path.join(directory, f) for f in files if f.endswith(".safetensors"))
    body = {
        "format": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "dynamoq_version": _version(),
        "files": files,
        "tensors": _tensor_table(_read_headers(weights)),
        "quantization_config": quantization_config,
        **(extra or {}),
    }
    manifest = {**body, "sha256": hashlib.sha256(_canonical(body)).hexdigest()}
    _write_file(os.path.join(directory, MANIFEST_NAME), _canonical(manifest))
    return manifest


def read_manifest(directory: str, path: str | None = None) -> dict:
    path = path or os.path.join(directory, MANIFEST_NAME)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not a dynamoq checkpoint: {MANIFEST_NAME} is missing") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    try:
        m = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: not valid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != QUANT_METHOD:
        raise CheckpointError(f"{path} is damaged or not a dynamoq manifest")
    _check_version(m.get("format_version"), path)
    body = {k: x for k, x in m.items() if k != "sha256"}
    try:
        canonical = _canonical(m)
        ok = m.get("sha256") == hashlib.sha256(_canonical(body)).hexdigest() and canonical == raw
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} is damaged: its checksum does not match its content")
    if not (isinstance(m.get("files"), dict) and isinstance(m.get("tensors"), dict)
            and isinstance(m.get("quantization_config"), dict)):
        raise CheckpointError(f"{path} is damaged: files, tensors or quantization_config missing")
    check_format(m["quantization_config"], path)
    return m


def _verify_wanted(verify: bool | None) -> bool:
    if verify is not None:
        return verify
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def check_files(directory: str, manifest: dict, weight_files: list[str] | None = None, verify: bool | None = None,
                locate=None) -> dict:
    """Every file the manifest lists is there with its size; the tensors in the weight files are exactly
    the saved ones (names, dtypes, shapes); then, unless verification is off, every file's sha256.
    Returns the safetensors headers {key: (file, dtype, shape)}."""
    paths = {}
    for rel, info in sorted(manifest["files"].items()):
        if not (isinstance(rel, str) and isinstance(info, dict) and set(info) == {"bytes", "sha256"}):
            raise CheckpointError(f"{directory}/{MANIFEST_NAME} is damaged: malformed file entry {rel!r}")
        path = os.path.join(directory, *rel.split("/"))
        if not os.path.isfile(path) and locate is not None:
            path = locate(rel) or path
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file {rel} in {directory} (the checkpoint is incomplete)")
        paths[rel] = path
    if weight_files is None:
        listed = {v.get("file") for v in manifest["tensors"].values() if isinstance(v, dict)}
        for f in listed:
            if f not in paths:
                raise CheckpointError(f"{MANIFEST_NAME} is damaged: tensors stored in unlisted file {f!r}")
        weight_files = [paths[f] for f in sorted(listed)]
    headers = _read_headers(weight_files)      # first, so that a missing or changed tensor is named
    check_tensor_table(headers, manifest)
    for rel, path in paths.items():
        size, saved = os.path.getsize(path), manifest["files"][rel]["bytes"]
        if size != saved:
            raise CheckpointError(f"{rel} is damaged or truncated: {size} bytes, {saved} were saved")
    if _verify_wanted(verify):
        for rel, path in paths.items():
            if _sha256_file(path) != manifest["files"][rel]["sha256"]:
                raise CheckpointError(f"{rel} is damaged: its sha256 differs from the one saved in {MANIFEST_NAME} "
                                      f"(if you edited it on purpose, run dynamoq.checkpoint.reseal({directory!r}))")
    return headers


def check_tensor_table(headers: dict, manifest: dict) -> None:
    """The tensors found in the files are exactly the ones saved (names, files, dtypes, shapes)."""
    saved = manifest["tensors"]
    for k in sorted(set(saved) - set(headers)):
        raise CheckpointError(f"missing tensor {k} (saved as {saved[k]})")
    for k in sorted(set(headers) - set(saved)):
        raise CheckpointError(f"unexpected tensor {k} in {headers[k][0]}")
    for k, (f, d, s) in headers.items():
        found = {"file": f, "dtype": d, "shape": list(s)}
        if saved[k] != found:
            raise CheckpointError(f"tensor {k}: found {found}, saved as {saved[k]}")


def reseal(directory: str) -> dict:
    """Re-write dynamoq.json after a deliberate edit of a checkpoint's files (e.g. config.json)."""
    m = read_manifest(directory)
    extra = {k: v for k, v in m.items() if k not in ("format", "format_version", "dynamoq_version", "files",
                                                     "tensors", "quantization_config", "sha256")}
    qc = m["quantization_config"]
    cfg = os.path.join(directory, CONFIG_NAME)
    if os.path.isfile(cfg):
        qc = _read_json(cfg).get("quantization_config", qc)
    return write_manifest(directory, qc, extra)


def _read_json(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is damaged: {e}") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path} is damaged: not a JSON object")
    return d


# ---- atomic directory writes --------------------------------------------------------------------------
def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                except OSError:     # e.g. Windows, where a read-only handle cannot be flushed
                    pass
                finally:
                    os.close(fd)
        _fsync_dir(d)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), b)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _siblings(target: str, tag: str) -> list[tuple[str, int]]:
    parent, name = os.path.split(target)
    prefix = f".{name}{tag}"
    out = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return out
    for e in entries:
        if e.startswith(prefix):
            m = re.match(r"(\d+)-", e[len(prefix):])
            out.append((os.path.join(parent, e), int(m.group(1)) if m else -1))
    return out


def recover(target: str) -> None:
    """Put the previous checkpoint back if a save crashed between its two renames (non-Linux path)."""
    target = os.path.realpath(os.fspath(target))
    if os.path.lexists(target):
        return
    olds = [p for p, pid in _siblings(target, _OLD_TAG) if pid == os.getpid() or not _pid_alive(pid)]
    if olds:
        newest = max(olds, key=os.path.getmtime)
        os.rename(newest, target)
        logger.warning("dynamoq: restored %s from %s, left by a save that did not finish", target, newest)


def _cleanup(target: str) -> None:
    """Remove what saves killed midway left next to `target`: their temporary directories, and the
    previous checkpoints they had moved aside (once `target` itself is in place again)."""
    for tag in (_TMP_TAG, _OLD_TAG):
        for path, pid in _siblings(target, tag):
            if pid != os.getpid() and not _pid_alive(pid) and (tag == _TMP_TAG or os.path.lexists(target)):
                shutil.rmtree(path, ignore_errors=True)


# files a new save replaces; everything else in an existing checkpoint directory (tokenizer, README,
# sub-directories) is carried over into the new one
_REPLACED = re.compile(r"(.*\.safetensors|.*\.safetensors\.index\.json|.*\.bin|.*\.bin\.index\.json|"
                       r"config\.json|generation_config\.json|" + re.escape(MANIFEST_NAME) + r")")


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str) -> None:
    if not os.path.isdir(old):
        return
    for e in os.listdir(old):
        src, dst = os.path.join(old, e), os.path.join(new, e)
        if os.path.lexists(dst) or _REPLACED.fullmatch(e):
            continue
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike):
    """Yields an empty temporary directory next to `target`; on success it replaces `target` in one
    step, with the files of the old `target` that it does not rewrite carried over."""
    target = os.path.realpath(os.fspath(target))
    parent, name = os.path.split(target)
    if os.path.lexists(target) and not os.path.isdir(target):
        raise CheckpointError(f"{target} exists and is not a directory")
    os.makedirs(parent, exist_ok=True)
    recover(target)
    _cleanup(target)
    tmp = tempfile.mkdtemp(prefix=f".{name}{_TMP_TAG}{os.getpid()}-", dir=parent)
    try:
        yield tmp
        _carry_over(target, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, (os.stat(target).st_mode & 0o7777) if os.path.isdir(target) else 0o777 & ~umask)
        _fsync_tree(tmp)
        _swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap(tmp: str, target: str) -> None:
    parent, name = os.path.split(target)
    if not os.path.lexists(target):
        os.rename(tmp, target)
        _fsync_dir(parent)
        return
    if _exchange(tmp, target):          # `tmp` now holds the previous checkpoint
        _fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tempfile.mkdtemp(prefix=f".{name}{_OLD_TAG}{os.getpid()}-", dir=parent)
    os.rmdir(old)
    os.rename(target, old)              # a crash from here ...
    os.rename(tmp, target)              # ... to here leaves `old`, which recover() puts back
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


# ---- dynamoq.save / dynamoq.load ----------------------------------------------------------------------
def _is_transformers_model(model) -> bool:
    return isinstance(model, PreTrainedModel)


def has_packed_weights(model: nn.Module) -> bool:
    return any(isinstance(p, _PackedWeight) for p in model.parameters())


def save(model: nn.Module, directory: str | os.PathLike, max_shard_size: int | str = "5GB", **kwargs) -> str:
    """Save a dynamoq-quantized model atomically. A transformers model goes through its save_pretrained
    (config.json, generation config, original key names); any other nn.Module gets safetensors shards
    and dynamoq.json, to be read back with `dynamoq.load(directory, model)`."""
    if _is_transformers_model(model):
        model.save_pretrained(directory, max_shard_size=max_shard_size, **kwargs)
        return os.fspath(directory)
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)} for a model that is not a transformers model")
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    flat, modules = flatten_state_dict(model.state_dict())
    flat, aliases = _dedupe(flat)
    qc = quantization_config_dict(model, modules)
    split = split_torch_state_dict_into_shards(flat, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    with atomic_directory(directory) as tmp:
        for fname, keys in split.filename_to_tensors.items():
            save_file({k: flat[k].contiguous() for k in keys}, os.path.join(tmp, fname), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
            _write_file(os.path.join(tmp, "model.safetensors.index.json"),
                        (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        write_manifest(tmp, qc, {"aliases": aliases})
    return os.fspath(directory)


def _dedupe(flat: dict) -> tuple[dict, dict]:
    """Tied tensors (one storage under several names) are stored once; {alias: stored name}."""
    seen, out, aliases = {}, {}, {}
    for k, t in flat.items():
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
                 t.dtype) if t.device.type != "meta" else None
        if ident is not None and t.numel() and ident in seen:
            aliases[k] = seen[ident]
        else:
            if ident is not None:
                seen[ident] = k
            out[k] = t
    return out, aliases


_VERIFIED = threading.local()


@contextlib.contextmanager
def _already_verified(directory: str):
    stack = getattr(_VERIFIED, "dirs", None)
    if stack is None:
        stack = _VERIFIED.dirs = []
    stack.append(os.path.realpath(directory))
    try:
        yield
    finally:
        stack.pop()


def _was_verified(directory: str) -> bool:
    return os.path.realpath(directory) in getattr(_VERIFIED, "dirs", ())


def load(directory: str | os.PathLike, model: nn.Module | type | None = None, *, dtype: torch.dtype | None = None,
         device: str | torch.device | None = None, verify: bool | None = None, **kwargs):
    """Load a dynamoq checkpoint, after checking every file against dynamoq.json.

    - a save_pretrained checkpoint: `load(dir)` (AutoModelForCausalLM) or `load(dir, SomeModelClass)`,
      extra keyword arguments go to from_pretrained;
    - a `dynamoq.save` checkpoint of another model: `load(dir, model)` fills `model` (a float or
      quantized instance of the same architecture, e.g. built on the meta device) and returns it.
    verify=False (or DYNAMOQ_VERIFY=0) skips the sha256 of the files; the structure is always checked."""
    directory = os.fspath(directory)
    recover(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory} is not a directory")
    manifest = read_manifest(directory)
    headers = check_files(directory, manifest, verify=verify)
    is_hf = CONFIG_NAME in manifest["files"]
    if is_hf:
        if model is not None and not isinstance(model, type):
            raise CheckpointError(f"{directory} was written by save_pretrained: load it with dynamoq.load(dir) "
                                  f"or dynamoq.load(dir, {type(model).__name__}), not into an instance")
        cfg = _read_json(os.path.join(directory, CONFIG_NAME))
        if _canonical(cfg.get("quantization_config")) != _canonical(manifest["quantization_config"]):
            raise CheckpointError(f"{directory}: the quantization_config of config.json differs from {MANIFEST_NAME}")
        if model is None:
            from transformers import AutoModelForCausalLM as model
        if dtype is not None:
            kwargs["dtype"] = dtype
        if device is not None:
            kwargs["device_map"] = device
        with _already_verified(directory):
            return model.from_pretrained(directory, **kwargs)
    if model is None or isinstance(model, type):
        raise CheckpointError(f"{directory} was saved from a model that is not a transformers model: pass the "
                              f"model to fill, dynamoq.load({directory!r}, model)")
    if kwargs:
        raise TypeError(f"unexpected arguments {sorted(kwargs)}")
    _load_into(directory, manifest, headers, model, dtype, device)
    return model


def _load_into(directory: str, manifest: dict, headers: dict, model: nn.Module, dtype, device) -> None:
    from safetensors import safe_open

    modules = manifest["quantization_config"]["modules"]
    aliases = manifest.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(v, str) and v in headers for v in aliases.values()):
        raise CheckpointError(f"{MANIFEST_NAME} is damaged: malformed aliases")
    index = _PartIndex(modules)
    found, plain = {}, {}
    for key, (f, d, s) in headers.items():
        hit = index.parse(key)
        if hit and hit[0] in modules:
            found.setdefault(hit[0], {})[hit[1]] = (key, s, d)
        else:
            plain[key] = (f, d, s)
    _check_parts_present(found, modules)

    state = model.state_dict(keep_vars=True)
    for fqn, meta in modules.items():
        if fqn not in state:
            raise CheckpointError(f"the checkpoint holds {fqn}, which {type(model).__name__} does not have")
        if list(state[fqn].shape) != meta["shape"]:
            raise CheckpointError(f"{fqn}: the checkpoint holds shape {meta['shape']}, the model "
                                  f"{list(state[fqn].shape)} (a different model configuration?)")
    for key in plain:
        if key not in state:
            raise CheckpointError(f"unexpected tensor {key}: {type(model).__name__} has no such parameter or buffer")
    for key in aliases:
        if key not in state:
            raise CheckpointError(f"unexpected tensor {key}: {type(model).__name__} has no such parameter or buffer")
    for key in state:
        if key not in plain and key not in modules and key not in aliases:
            raise CheckpointError(f"missing tensor {key}: the checkpoint does not hold it")
    for key, (_, d, s) in plain.items():
        if tuple(state[key].shape) != s:
            raise CheckpointError(f"tensor {key}: the checkpoint holds {list(s)}, the model {list(state[key].shape)}")

    by_file: dict[str, list[str]] = {}
    for key, (f, _, _) in headers.items():
        by_file.setdefault(f, []).append(key)
    loaded = {}
    for f, keys in by_file.items():
        path = os.path.join(directory, f)
        try:
            with safe_open(path, framework="pt", device=str(device) if device is not None else "cpu") as h:
                for k in keys:
                    loaded[k] = h.get_tensor(k)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensors ({e})") from e

    new_state = {}
    for key in plain:
        t = loaded[key]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        new_state[key] = t
    for key, src in aliases.items():
        new_state[key] = new_state.get(src, loaded[src])
    for fqn, meta in modules.items():
        parts = {p: loaded[key] for p, (key, _, _) in found[fqn].items()}
        new_state[fqn] = nn.Parameter(build_tensor(fqn, meta, parts, dtype), requires_grad=False)
    for fqn in modules:
        mod, _, leaf = fqn.rpartition(".")
        owner = model.get_submodule(mod) if mod else model
        if leaf not in owner._parameters:
            raise CheckpointError(f"{fqn} is not a parameter of {type(model).__name__}")
        owner._parameters[leaf] = new_state.pop(fqn)
    model.load_state_dict(new_state, strict=False, assign=True)


# ---- transformers integration ---------------------------------------------------------------------------

class DynamoqConfig(QuantizationConfigMixin):
    """`quantization_config` of a dynamoq checkpoint (see `quantization_config_dict`)."""

    def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION, **kwargs):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = modules if modules is not None else {}
        for k, v in kwargs.items():
            setattr(self, k, v)
        check_format(self.to_dict(), "quantization_config")

    def to_dynamo_config(self):
        """The DynaMoConfig that re-creates this layout from the float model."""
        c = getattr(self, "config", None) or {}
        return DynaMoConfig(expert_bits={int(k): list(v) for k, v in (c.get("expert_bits") or {}).items()} or None,
                            bits=None if c.get("expert_bits") else 4, group_size=c.get("group_size") or 128,
                            shared_bits=c.get("shared_bits"), dense_bits=c.get("dense_bits"),
                            attention_bits=c.get("attention_bits"), lm_head_bits=c.get("lm_head_bits"),
                            experts_implementation=c.get("experts_implementation"))


class DynamoqDeserialize(ConversionOps):
    """Builds one packed weight from its parts, as transformers loads them."""

    def __init__(self, quantizer, part_of: dict[str, str]):
        self.quantizer, self.part_of = quantizer, part_of

    def __deepcopy__(self, memo):     # stateless: transformers copies converters once per weight
        return self

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, **kwargs):
        try:
            parts = {}
            for pattern, tensors in input_dict.items():
                tensors = tensors if isinstance(tensors, list) else [tensors]
                if len(tensors) != 1:
                    raise CheckpointError(f"{full_layer_name}: {len(tensors)} tensors for part "
                                          f"{self.part_of[pattern]}")
                parts[self.part_of[pattern]] = tensors[0]
            t = self.quantizer.build(full_layer_name, parts)
            return {full_layer_name: nn.Parameter(t, requires_grad=False)}
        except Exception as e:
            self.quantizer.errors[full_layer_name] = str(e)
            raise

    @property
    def reverse_op(self):
        raise CheckpointError("dynamoq parts are flattened by the quantizer, not by a reverse conversion")


class DynamoqHfQuantizer(HfQuantizer):
    """from_pretrained of a dynamoq checkpoint: checks it, then loads the packed parts straight into
    DynaMoExperts / SwitchableLinear (no full-precision expert weight is ever materialized)."""

    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.errors: dict[str, str] = {}
        self.model_to_meta: dict[str, str] = {}
        self.headers: dict | None = None
        self.dtype = None

    # -- before the model exists
    def validate_environment(self, device_map=None, **kwargs):
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise CheckpointError("dynamoq checkpoints cannot be offloaded to disk; "
                                  "use a device_map without 'disk'")

    def update_dtype(self, dtype):
        self.dtype = dtype
        return dtype

    def update_attn_implementation(self, config):
        guard = getattr(config, "transformers_weights", None)
        if isinstance(guard, str) and QUANT_METHOD in guard and not guard.endswith(".safetensors") \
                and not guard.endswith(".safetensors.index.json"):
            delattr(config, "transformers_weights")     # our guard against loading without dynamoq
        impl = getattr(self.quantization_config, "experts_implementation", None)
        if impl and getattr(config, "_experts_implementation", None) is None:
            config._experts_implementation = impl
        return config

    # -- the model exists on the meta device; checkpoint files are known
    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        qc = self.quantization_config.to_dict()
        modules = qc["modules"]
        if checkpoint_files:
            directory = os.path.dirname(checkpoint_files[0])
            manifest = read_manifest(directory, self._locate(model, directory, MANIFEST_NAME))
            if _canonical(manifest["quantization_config"]) != _canonical(qc):
                raise CheckpointError(f"{directory}: the quantization_config of config.json differs from "
                                      f"{MANIFEST_NAME}")
            if not all(f.endswith(".safetensors") for f in checkpoint_files):
                raise CheckpointError(f"{directory}: dynamoq loads safetensors files only")
            listed = {v.get("file") for v in manifest["tensors"].values() if isinstance(v, dict)}
            if {os.path.basename(f) for f in checkpoint_files} != listed:
                raise CheckpointError(f"{directory}: transformers found weight files "
                                      f"{sorted(os.path.basename(f) for f in checkpoint_files)}, the manifest "
                                      f"lists {sorted(listed)}")
            self.headers = check_files(directory, manifest, list(checkpoint_files),
                                       verify=False if _was_verified(directory) else None,
                                       locate=lambda rel: self._locate(model, directory, rel))
        params = dict(model.named_parameters())
        prefix = model.base_model_prefix
        for fqn, meta in modules.items():
            expected_parts(fqn, meta)
            cands = [fqn, fqn.removeprefix(f"{prefix}."), f"{prefix}.{fqn}"] if prefix else [fqn]
            name = next((c for c in cands if c in params), None)
            if name is None:
                raise CheckpointError(f"quantization_config holds {fqn}, which {type(model).__name__} "
                                      f"does not have")
            if list(params[name].shape) != meta["shape"]:
                raise CheckpointError(f"{fqn}: the checkpoint holds shape {meta['shape']}, the model "
                                      f"{list(params[name].shape)} (config.json and the weights disagree)")
            self.model_to_meta[name] = fqn

    @staticmethod
    def _locate(model, directory, rel):
        path = os.path.join(directory, rel)
        if os.path.isfile(path):
            return path
        try:  # a Hub snapshot holds only the files transformers asked for
            from transformers.utils import cached_file
            return cached_file(model.config.name_or_path, rel, _raise_exceptions_for_missing_entries=False)
        except Exception:
            return None

    def _converters(self):
        parts_by_leaf: dict[str, set[str]] = {}
        for fqn, meta in self.quantization_config.modules.items():
            parts_by_leaf.setdefault(fqn.rpartition(".")[2], set()).update(meta["parts"])
        out = []
        for leaf, parts in sorted(parts_by_leaf.items()):
            part_of = {re.escape(f"._{leaf}_{p}"): p for p in sorted(parts)}
            out.append(WeightConverter(list(part_of), f".{leaf}", operations=[DynamoqDeserialize(self, part_of)]))
        return out

    def update_weight_conversions(self, weight_conversions, model):
        """Our converters go first; every checkpoint key is renamed as transformers will rename it,
        and the packed parts are checked against quantization_config before anything is read."""
        ours = self._converters()
        if self.headers is not None:
            renamings = [c for c in weight_conversions if isinstance(c, WeightRenaming)]
            converters = [c for c in weight_conversions if isinstance(c, WeightConverter)]
            modules = self.quantization_config.modules
            index = _PartIndex(modules)
            prefix = model.base_model_prefix
            found: dict[str, dict] = {}
            for key, (_, d, s) in self.headers.items():
                renamed, pattern = rename_source_key(key, renamings, converters)
                hit = None
                for cand in ([renamed, renamed.removeprefix(f"{prefix}."), f"{prefix}.{renamed}"]
                             if prefix else [renamed]):
                    hit = index.parse(cand)
                    if hit and hit[0] in modules:
                        break
                    hit = None
                if hit is None:
                    continue
                if pattern is not None:
                    raise CheckpointError(f"{key}: transformers' conversion {pattern!r} of "
                                          f"{type(model).__name__} would rewrite this packed tensor")
                found.setdefault(hit[0], {})[hit[1]] = (key, s, d)
            _check_parts_present(found, modules)
        for c in weight_conversions:
            if isinstance(c, WeightConverter) and any(isinstance(op, DynamoqDeserialize) for op in c.operations):
                return list(weight_conversions)
        return ours + list(weight_conversions)

    def get_new_dtype(self, converter, param, dtype):
        if any(isinstance(op, DynamoqDeserialize) for op in getattr(converter, "operations", ())):
            return None            # packed parts keep their stored dtype, bit for bit
        return super().get_new_dtype(converter, param, dtype)

    def build(self, name: str, parts: dict) -> _PackedWeight:
        fqn = self.model_to_meta.get(name)
        if fqn is None:
            raise CheckpointError(f"{name}: packed parts for a weight that quantization_config does not list")
        saved = getattr(self.quantization_config, "dtype", None)
        override = self.dtype if (isinstance(self.dtype, torch.dtype) and saved is not None
                                  and _dtype_name(self.dtype) != saved) else None
        return build_tensor(fqn, self.quantization_config.modules[fqn], parts, override)

    # -- after the weights are in
    def _process_model_after_weight_loading(self, model, **kwargs):
        missing = [n for n in self.model_to_meta if not isinstance(model.get_parameter(n), _PackedWeight)]
        if self.errors or missing:
            detail = "; ".join(f"{k}: {v}" for k, v in self.errors.items()) or f"missing tensors for {missing[0]}"
            raise CheckpointError(f"could not rebuild the packed weights: {detail}")
        convs = getattr(model, "_weight_conversions", None)
        if convs:   # only the model's own conversions are reverted when it is saved again
            model._weight_conversions = [c for c in convs if not any(
                isinstance(op, DynamoqDeserialize) for op in getattr(c, "operations", ()))]
        return model

    def _dequantize(self, model, dtype=None):
        for name, p in list(model.named_parameters()):
            if isinstance(p, _PackedWeight):
                mod, _, leaf = name.rpartition(".")
                owner = model.get_submodule(mod) if mod else model
                owner._parameters[leaf] = nn.Parameter(p.dequantize(dtype or p.dtype), requires_grad=False)
        return model

    def get_state_dict_and_metadata(self, model):
        flat, _ = flatten_state_dict(model.state_dict())
        return flat, {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self):
        return False

    @property
    def is_compileable(self):
        return True


def _register_transformers() -> None:
    """quant_method "dynamoq" for transformers, and save_pretrained of models with packed weights."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DynamoqConfig)
    else:
        AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = DynamoqConfig
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DynamoqHfQuantizer)
    else:
        AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = DynamoqHfQuantizer

    original = PreTrainedModel.save_pretrained
    original = getattr(original, "__dynamoq_original__", original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        if not has_packed_weights(self):
            return original(self, *args, **kwargs)
        return _save_pretrained(original, self, *args, **kwargs)

    save_pretrained.__dynamoq_original__ = original
    PreTrainedModel.save_pretrained = save_pretrained


_MISSING = object()


def _save_pretrained(original, model, *args, **kwargs):
    """save_pretrained of a model with packed weights: transformers writes config.json, the generation
    config and the (flattened) safetensors into a temporary directory; we add the `transformers_weights`
    guard and the manifest, then swap the directory into place."""
    bound = inspect.signature(original).bind(model, *args, **kwargs)
    named = {k: v for k, v in bound.arguments.items() if k not in ("self", "kwargs")}
    extra = bound.arguments.get("kwargs", {})
    save_directory = named.pop("save_directory")
    if named.get("distributed_checkpoint"):
        raise CheckpointError("distributed_checkpoint=True is not supported for dynamoq-quantized models")
    if not named.pop("is_main_process", True):
        return None
    if os.path.isfile(save_directory):
        logger.error("Provided path (%s) should be a directory, not a file", save_directory)
        return None
    push_to_hub = named.pop("push_to_hub", False)
    state_dict = named.pop("state_dict", None)
    from .quantize import untie_packed
    untie_packed(model)        # a head packed through torchao's quantize_ alone: tied, loading would replace it
    flat, modules = flatten_state_dict(state_dict if state_dict is not None else model.state_dict())
    qc = DynamoqConfig(**quantization_config_dict(model, modules))
    with atomic_directory(save_directory) as tmp:
        old_qc = model.config.__dict__.get("quantization_config", _MISSING)
        old_hfq = model.__dict__.get("hf_quantizer", _MISSING)
        model.config.quantization_config = qc
        model.hf_quantizer = None          # we hand transformers the flattened state dict ourselves
        try:
            original(model, tmp, state_dict=flat, **named, **extra)
        finally:
            if old_qc is _MISSING:
                model.config.__dict__.pop("quantization_config", None)
            else:
                model.config.quantization_config = old_qc
            if old_hfq is _MISSING:
                model.__dict__.pop("hf_quantizer", None)
            else:
                model.hf_quantizer = old_hfq
        cfg_path = os.path.join(tmp, CONFIG_NAME)
        cfg = _read_json(cfg_path)
        cfg["transformers_weights"] = INSTALL_HINT     # transformers without dynamoq stops on this
        _write_file(cfg_path, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        write_manifest(tmp, cfg["quantization_config"])
    if push_to_hub:    # uploads a fresh save (through this function again) of the same model
        hub = {k: extra[k] for k in ("commit_message", "private", "create_pr", "revision") if k in extra}
        model.push_to_hub(extra.get("repo_id") or os.path.basename(os.path.realpath(save_directory)),
                          token=named.get("token"), max_shard_size=named.get("max_shard_size"), **hub)
    return None


_register_transformers()

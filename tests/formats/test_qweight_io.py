"""QuantizedWeight serialisation: as_dict/from_dict (the checkpoint record), to_tensors/from_tensors,
state_dict (module buffers), safetensors, and clear errors (naming the entry) for corrupt, incomplete or
mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qbackend.formats import (
    FORMAT_VERSION,
    SCHEME_DICT_VERSION,
    TENSOR_KEYS,
    FormatError,
    QuantizedWeight,
    QuantizedWeightModule,
    Scheme,
    quantize,
)
from qbackend.formats._strategies import weights

SCHEMES = [
    Scheme("nf4", blocksize=64),
    Scheme("nf4", blocksize=64, nested=True),
    Scheme("fp4", blocksize=128, nested=True),
    Scheme("fp4", blocksize=4096),
    Scheme("int", 8, True, "channel"),
    Scheme("int", 8, False, "channel", axis=1),
    Scheme("int", 4, True, "block", blocksize=32),
    Scheme("int", 4, True, "block", blocksize=32, nested=True),
    Scheme("int", 4, False, "block", blocksize=64),
    Scheme("int", 8, True, "tensor"),
]
IDS = [s.name for s in SCHEMES]


def _same(a: QuantizedWeight, b: QuantizedWeight) -> None:
    assert a.scheme == b.scheme and a.shape == b.shape and a.dtype == b.dtype
    ta, tb = a.to_tensors(), b.to_tensors()
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].reshape(-1), tb[k].reshape(-1)), k
    assert torch.equal(a.dequantize(), b.dequantize())


def _weight(scheme: Scheme, shape=(48, 80), dtype=torch.float32) -> QuantizedWeight:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    return quantize(w, scheme, name="layer.weight")


@settings(max_examples=30)
@given(data=st.data(), scheme=st.sampled_from(SCHEMES))
def test_to_tensors_round_trip(data, scheme):
    w = data.draw(weights(blocksize=scheme.blocksize, max_numel=3000, patterns=("normal", "zero_blocks", "mixed")))
    if scheme.granularity == "channel" and w.dim() < 2:
        w = w.reshape(1, -1)
    qw = quantize(w, scheme)
    _same(QuantizedWeight.from_tensors(qw.to_tensors()), qw)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_safetensors_round_trip(scheme, tmp_path):
    qw = _weight(scheme, dtype=torch.bfloat16)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in qw.to_state_dict("layer.weight.").items()}, str(path))
    back = QuantizedWeight.from_state_dict(load_file(str(path)), "layer.weight.")
    _same(back, qw)


def test_records_of_many_weights_through_one_safetensors_file(tmp_path):
    """The per-weight record (as_dict) splits into named tensors and JSON; both go in one file and back."""
    qws = {f"layers.{i}.weight": _weight(s, shape=(16 + i, 70)) for i, s in enumerate(SCHEMES)}
    path = tmp_path / "model.safetensors"
    tensors, meta = {}, {}
    for name, qw in qws.items():
        rec = qw.as_dict()
        tensors.update({f"{name}.{k}": v.contiguous() for k, v in rec.items() if isinstance(v, torch.Tensor)})
        meta[name] = {k: v for k, v in rec.items() if not isinstance(v, torch.Tensor)}
    save_file(tensors, str(path), metadata={"weights": json.dumps(meta)})
    flat = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta_back = json.loads(f.metadata()["weights"])
    back = {n: QuantizedWeight.from_dict({**m, **{k: flat[f"{n}.{k}"] for k in TENSOR_KEYS if f"{n}.{k}" in flat}}, n)
            for n, m in meta_back.items()}  # fmt: skip
    assert back.keys() == qws.keys()
    for k in qws:
        _same(back[k], qws[k])


@settings(max_examples=30)
@given(data=st.data(), scheme=st.sampled_from(SCHEMES))
def test_as_dict_round_trip(data, scheme):
    w = data.draw(weights(blocksize=scheme.blocksize, max_numel=3000, patterns=("normal", "zero_blocks", "mixed")))
    if scheme.granularity == "channel" and w.dim() < 2:
        w = w.reshape(1, -1)
    qw = quantize(w, scheme)
    rec = qw.as_dict()
    json.dumps({k: v for k, v in rec.items() if not isinstance(v, torch.Tensor)})  # the rest is plain JSON
    assert {k for k, v in rec.items() if isinstance(v, torch.Tensor)} <= set(TENSOR_KEYS)
    assert rec["scheme"] == scheme.as_dict() and rec["scheme"]["version"] == SCHEME_DICT_VERSION
    _same(QuantizedWeight.from_dict(rec), qw)


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_scheme_dict_round_trip(scheme):
    assert Scheme.from_dict(json.loads(json.dumps(scheme.as_dict()))) == scheme


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "scheme version 2 is not supported"),
        (lambda d: d.pop("version"), "scheme version None is not supported"),
        (lambda d: d.update(rounding="stochastic"), r"unknown field\(s\) \['rounding'\]"),
        (lambda d: d.pop("axis"), r"missing field\(s\) \['axis'\]"),
        (lambda d: d.update(kind="nf5"), "layer.weight.scheme: unknown format kind 'nf5'"),
        (lambda d: d.update(bits="4"), "layer.weight.scheme: Scheme.bits must be an int"),
    ],
    ids=["newer", "no-version", "unknown-key", "missing-key", "bad-kind", "bad-type"],
)
def test_scheme_from_dict_errors(edit, message):
    d = Scheme("nf4", nested=True).as_dict()
    edit(d)
    with pytest.raises(FormatError, match=message):
        Scheme.from_dict(d, name="layer.weight.scheme")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.update(version=2), "layer.weight: quantized-weight record version 2 is not supported"),
        (lambda d: d.update(extra=1), r"layer.weight: unknown entries \['extra'\]"),
        (lambda d: d.pop("scale"), "layer.weight.scale: missing"),
        (lambda d: d.update(dtype="float64"), "dtype 'float64' is not supported"),
        (lambda d: d.update(shape=[3, -1]), "bad shape"),
        (lambda d: d["scheme"].update(version=9), "layer.weight.scheme: scheme version 9"),
        (lambda d: d.update(codes=d["codes"][:-1]), "layer.weight.codes: .* elements"),
    ],
    ids=["newer", "unknown", "missing-tensor", "dtype", "shape", "scheme-version", "codes-size"],
)
def test_weight_from_dict_errors(edit, message):
    d = _weight(Scheme("int", 4, symmetric=True, granularity="block", blocksize=32)).as_dict()
    edit(d)
    with pytest.raises(FormatError, match=message):
        QuantizedWeight.from_dict(d, name="layer.weight")


class _Model(torch.nn.Module):
    def __init__(self, qw: QuantizedWeight | None) -> None:
        super().__init__()
        self.proj = QuantizedWeightModule(qw)
        self.bias = torch.nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_module_state_dict_round_trip(scheme, tmp_path):
    qw = _weight(scheme, dtype=torch.float16)
    model = _Model(qw)
    sd = model.state_dict()
    assert "proj.codes" in sd and "proj.meta" in sd and "bias" in sd
    # A fresh module holding a different (smaller) weight takes the checkpoint's sizes.
    fresh = _Model(_weight(Scheme("nf4", blocksize=32), shape=(4, 4)))
    fresh.load_state_dict(sd)
    _same(fresh.proj.qweight, qw)
    # ... also through torch.save (weights_only) and safetensors
    torch.save(sd, tmp_path / "m.pt")
    again = _Model(None)
    again.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    _same(again.proj.qweight, qw)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    third = _Model(None)
    third.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    _same(third.proj.qweight, qw)


def test_module_keeps_dtypes_under_casts():
    m = QuantizedWeightModule(_weight(Scheme("nf4", nested=True)))
    before = {k: v.dtype for k, v in m.named_buffers()}
    m.half()
    m.to(torch.bfloat16)
    assert {k: v.dtype for k, v in m.named_buffers()} == before
    assert m.dequantize().dtype == torch.float32
    assert "nf4-b64-nested" in repr(m)


def test_module_strict_loading_reports_missing_and_unexpected():
    m = _Model(_weight(Scheme("nf4")))
    res = _Model(None).load_state_dict({"bias": torch.zeros(3)}, strict=False)
    assert res.missing_keys == [] or all(k.startswith("proj.") for k in res.missing_keys)
    sd = m.state_dict()
    sd["proj.bogus"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="proj.bogus"):
        _Model(None).load_state_dict(sd)
    sd.pop("proj.bogus")
    with pytest.raises(RuntimeError, match="proj.codes"):
        _Model(_weight(Scheme("nf4"))).load_state_dict({"bias": torch.zeros(3)})


def test_module_load_corrupt_entry_names_it():
    sd = _Model(_weight(Scheme("nf4", nested=True))).state_dict()
    sd["proj.nested_absmax"] = sd["proj.nested_absmax"][:0]
    with pytest.raises(FormatError, match=r"proj\.nested_absmax: 0 elements"):
        _Model(None).load_state_dict(sd)


# ---- corrupt / incomplete checkpoints -------------------------------------------------------------------
def _tensors(scheme: Scheme | None = None) -> dict[str, torch.Tensor]:
    return dict(_weight(scheme or Scheme("nf4", nested=True)).to_tensors())


def _meta(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)


def _load(t: dict) -> QuantizedWeight:
    return QuantizedWeight.from_tensors(t, name="layer.weight")


def _orig_meta() -> dict:
    return json.loads(bytes(_tensors()["meta"].tolist()).decode())


def test_corrupt_meta_bytes():
    t = _tensors()
    t["meta"] = torch.tensor([0xFF, 0xFE, 0x00], dtype=torch.uint8)
    with pytest.raises(FormatError, match=r"layer\.weight\.meta: corrupt quantized-weight metadata"):
        _load(t)
    t["meta"] = torch.tensor(list(b"[1, 2]"), dtype=torch.uint8)
    with pytest.raises(FormatError, match=r"layer\.weight\.meta: corrupt .*not a JSON object"):
        _load(t)
    t["meta"] = torch.zeros(3, dtype=torch.float32)
    with pytest.raises(FormatError, match=r"layer\.weight\.meta: corrupt .*uint8"):
        _load(t)


def test_missing_meta():
    t = _tensors()
    del t["meta"]
    with pytest.raises(FormatError, match=r"layer\.weight\.meta: missing; not a qbackend quantized weight"):
        _load(t)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_wrong_version(version):
    t = _tensors()
    meta = _orig_meta()
    meta["version"] = version
    t["meta"] = _meta(meta)
    with pytest.raises(
        FormatError, match=rf"layer\.weight\.meta: quantized-weight format version .* not supported .*{FORMAT_VERSION}"
    ):
        _load(t)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["scheme"].update(blocksize=48), r"meta: nf4 block size 48 is not supported; supported: \(32, 64"),
        (lambda m: m["scheme"].update(colour="red"), r"meta: corrupt quantized-weight metadata \(scheme"),
        (lambda m: m["scheme"].update(blocksize="64"), r"meta: Scheme.blocksize must be an int"),
        (lambda m: m.update(scheme=None), r"meta: corrupt quantized-weight metadata \(no scheme\)"),
        (lambda m: m.update(shape=[48, -80]), r"meta: corrupt .*bad shape"),
        (lambda m: m.update(shape="48x80"), r"meta: corrupt .*bad shape"),
        (
            lambda m: m.update(dtype="float64"),
            r"meta: dtype 'float64' is not supported; supported: float32, float16, bfloat16",
        ),
        (
            lambda m: m.update(shape=[48, 81]),
            r"layer\.weight\.codes: 1920 elements for shape \(48, 81\).*expected 1944",
        ),
    ],
)
def test_bad_meta_fields(edit, message):
    t = _tensors()
    meta = _orig_meta()
    edit(meta)
    t["meta"] = _meta(meta)
    with pytest.raises(FormatError, match=message):
        _load(t)


@pytest.mark.parametrize(
    ("scheme", "key"),
    [
        (Scheme("nf4", nested=True), "codes"),
        (Scheme("nf4", nested=True), "nested_codes"),
        (Scheme("nf4", nested=True), "nested_absmax"),
        (Scheme("nf4", nested=True), "nested_offset"),
        (Scheme("nf4"), "scale"),
        (Scheme("int", 4, False, "block", blocksize=64), "zero_point"),
        (Scheme("int", 8, True, "channel"), "scale"),
    ],
    ids=str,
)
def test_missing_tensor_is_named(scheme, key):
    t = _tensors(scheme)
    del t[key]
    with pytest.raises(FormatError, match=rf"layer\.weight\.{key}: missing"):
        _load(t)


@pytest.mark.parametrize(
    ("scheme", "key", "change", "message"),
    [
        (Scheme("nf4"), "codes", lambda t: t[:-1], r"codes: 1919 elements .* expected 1920"),
        (Scheme("nf4"), "scale", lambda t: torch.cat([t, t[:1]]), r"scale: 61 elements .* expected 60"),
        (Scheme("nf4"), "scale", lambda t: t.half(), r"scale: dtype torch.float16, expected torch.float32"),
        (Scheme("nf4"), "codes", lambda t: t.int(), r"codes: dtype torch.int32, expected torch.uint8"),
        (Scheme("nf4", nested=True), "nested_codes", lambda t: t[:5], r"nested_codes: 5 elements .* expected 60"),
        (
            Scheme("nf4", nested=True),
            "nested_absmax",
            lambda t: torch.cat([t, t]),
            r"nested_absmax: 2 elements .* expected 1",
        ),
        (Scheme("nf4", nested=True), "nested_offset", lambda t: t.double(), r"nested_offset: dtype torch.float64"),
        (
            Scheme("int", 8, True, "channel"),
            "codes",
            lambda t: t.view(torch.uint8),
            r"codes: dtype torch.uint8, expected torch.int8",
        ),
        (Scheme("int", 8, True, "channel"), "scale", lambda t: t[:-2], r"scale: 46 elements .* expected 48"),
        (
            Scheme("int", 4, False, "block", blocksize=64),
            "zero_point",
            lambda t: t[:1],
            r"zero_point: 2 elements .* expected 96",
        ),
    ],
    ids=str,
)
def test_wrong_size_or_dtype_is_named(scheme, key, change, message):
    t = _tensors(scheme)
    t[key] = change(t[key])
    with pytest.raises(FormatError, match=rf"layer\.weight\.{message}"):
        _load(t)


def test_unexpected_entry_is_named():
    t = _tensors(Scheme("nf4", nested=True))
    t["scale"] = torch.ones(60)
    with pytest.raises(FormatError, match=r"layer\.weight\.scale: unexpected entry for nf4-b64-nested"):
        _load(t)


def test_from_state_dict_ignores_other_keys_and_names_prefix():
    qw = _weight(Scheme("fp4"))
    sd = {**qw.to_state_dict("a.b."), "a.c.codes": torch.zeros(1), "other": torch.zeros(2)}
    _same(QuantizedWeight.from_state_dict(sd, "a.b."), qw)
    del sd["a.b.scale"]
    with pytest.raises(FormatError, match=r"^a\.b\.scale: missing"):
        QuantizedWeight.from_state_dict(sd, "a.b.")

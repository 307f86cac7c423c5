"""QuantizedWeight serialisation: to_tensors/from_tensors, state_dict (module buffers), safetensors,
and clear errors (naming the entry) for corrupt, incomplete or mismatched checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from qbackend.formats import (
    FORMAT_VERSION,
    FormatError,
    QuantizedWeight,
    QuantizedWeightModule,
    Scheme,
    load_safetensors,
    quantize,
    save_safetensors,
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


def test_save_and_load_safetensors_helpers(tmp_path):
    qws = {f"layers.{i}.weight": _weight(s, shape=(16 + i, 70)) for i, s in enumerate(SCHEMES)}
    path = tmp_path / "model.safetensors"
    save_safetensors(qws, path, metadata={"source": "test"})
    back = load_safetensors(path)
    assert back.keys() == qws.keys()
    for k in qws:
        _same(back[k], qws[k])


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

"""Prepared calls of the CPU weight-only kernels: the Python work that depends only on the weight, done once.

A quantized linear call on a small input (LLM decode: M = 1) spent most of its time in Python before
the C++ kernel started: binding and validating ~15 arguments, building the kernel's ctypes descriptor
(for nf4 in int8 compute also reading the code table), converting the bias, a torch reduction to
check the output finite. Here a `Prepared` call per weight holds the descriptor and the ctypes
function, its weight tensors validated once. It is keyed on what those depend on: the op, the compute
mode, the ints, and each weight tensor's address and version counter (``resize_``/``set_`` bump the
version, so a weight changed in shape or place is prepared again); a repeat call with the same
tensor objects at the same versions finds its entry without rebuilding that key. Weight values are read through
the pointers at call time, as on the regular path, so in-place updates are seen; the one value baked
into a descriptor (the int8 image of a codebook's table) is compared byte for byte on each call (in
the int8 compute mode by the kernel call itself, which also checks the output finite).

A call checks x and the bias (attribute reads), runs the kernel into a fresh output and checks that
output in C. Anything outside the common case (x not contiguous fp32, M beyond the fused kernels or
0, NaN/Inf in x or the output, a kernel declining the call, a mode without a prepared kernel) returns
None from :meth:`FastKernel.linear`, and the caller runs the regular kernel, which computes exactly
what it would have: results are bit-identical to the regular path.
"""

from __future__ import annotations

import ctypes
import sys
import weakref
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
from torch import Tensor

from ..families import FAMILIES
from ..spec import OpFamily
from . import _build

_Kernel = Callable[..., Tensor]


class Prepared:
    """One weight's kernel call with everything but x, the bias, the output and the thread count bound."""

    __slots__ = ("call", "checked", "group_call", "member", "member_refs", "n", "k", "limit", "refs", "table",
                 "table_bytes")

    def __init__(self, call: Callable[[int, int, int | None, int, int], int], n: int, k: int, limit: str | None,
                 table: Tensor | None = None) -> None:  # fmt: skip
        self.call = call  # (x ptr, m, bias ptr, y ptr, threads) -> 0 when it wrote every row of y
        self.n, self.k = n, k
        self.limit = limit  # the CPU package's attribute giving the most rows of x it takes (None: any)
        self.refs: tuple = ()  # weak references to the weight tensors it was prepared (and validated) for
        # the table's bytes baked into the descriptor: a change (even through .data) re-prepares
        self.table = None if table is None else (ctypes.c_char * (table.numel() * 4)).from_address(table.data_ptr())
        self.table_bytes = None if self.table is None else self.table.raw
        # the call itself checks y finite (0: it is) and any table it baked (TABLE_CHANGED: prepare again)
        self.checked = False
        # as a member of a group call (group_linear): its C struct (no bias), the group call of its kernel
        # ((members, count, k, x ptr, m, y ptr, threads) -> 0 when it wrote every output, finite) and weak
        # references to buffers the struct points into (one gone: the members' own calls run)
        self.member: ctypes.Structure | None = None
        self.group_call: Callable[[ctypes.Array, int, int, int, int, int, int], int] | None = None
        self.member_refs: tuple[weakref.ref, ...] = ()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor: no version counter (its address still keys it)
        return -1


class FastKernel:
    """The prepared form of one op's direct CPU kernel (see the module docstring)."""

    def __init__(self, family: OpFamily, direct: _Kernel, prepare: Callable[..., Prepared | None]) -> None:
        self.family = family
        self.direct = direct  # the regular direct kernel: every case this one does not take
        self._prepare = prepare
        self._nw = len(family.weights)
        self._nargs = len(family.arg_names())  # x, weights, bias, ints, compute (weight-only families)
        self._cache: dict[tuple, Prepared | None] = {}
        # the last prepared call per first weight tensor (by id), with the objects and versions it was
        # looked up for: a repeat call checks those (identity, version) instead of rebuilding the key
        self._front: dict[int, tuple] = {}
        self.__name__ = f"{family.name}_fast_kernel"

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        """The direct kernel's calling form (compiled code): positional in schema order, ``compute`` by
        keyword too (as Inductor writes it)."""
        nw, nargs = self._nw, self._nargs
        if not kwargs and len(args) == nargs:
            compute = args[-1]
        elif len(args) == nargs - 1 and len(kwargs) == 1 and "compute" in kwargs:
            compute = kwargs["compute"]
        else:
            return self.direct(*args, **kwargs)
        y = self.linear(args[0], args[1 : 1 + nw], args[1 + nw], args[2 + nw : nargs - 1], compute)  # type: ignore[arg-type]
        return self.direct(*args, **kwargs) if y is None else y

    def prepared(self, tensors: Sequence[Tensor | None], statics: tuple[int, ...], compute: str) -> Prepared | None:
        """The prepared call for these weight tensors, ints and mode (None: none for them)."""
        front = self._front.get(id(tensors[0]))
        if front is not None and front[1] == compute and front[2] == statics:
            p, _, _, refs, versions = front
            try:
                for t, r, v in zip(tensors, refs, versions, strict=True):
                    if t is None:
                        if r is not None:
                            break
                    elif r is None or r() is not t or t._version != v:
                        break
                else:
                    if p is None or p.table is None or p.table.raw == p.table_bytes:
                        return p
            except (RuntimeError, ValueError):  # an inference tensor (no version counter), another count
                pass
        p = self._prepared(tensors, statics, compute)
        try:
            entry = (p, compute, statics, tuple(None if t is None else weakref.ref(t) for t in tensors),
                     tuple(None if t is None else t._version for t in tensors))  # fmt: skip
        except (RuntimeError, TypeError):  # inference tensors: the full key each time
            return p
        if len(self._front) > 1024:
            self._front.clear()
        self._front[id(tensors[0])] = entry
        return p

    def _prepared(self, tensors: Sequence[Tensor | None], statics: tuple[int, ...], compute: str) -> Prepared | None:
        key: list = [compute, statics]
        add = key.append
        try:
            for t in tensors:
                if t is None:
                    add(None)
                else:
                    add(t.data_ptr())
                    add(t._version)
        except RuntimeError:  # an inference tensor among them (no version counter)
            key = [compute, statics, *[None if t is None else (t.data_ptr(), _version(t)) for t in tensors]]
        k = tuple(key)
        try:
            p = self._cache[k]
        except KeyError:
            return self._make(k, tensors, statics, compute)
        except TypeError:  # symbolic ints
            return None
        if p is None:
            return None
        for r, t in zip(p.refs, tensors, strict=False):  # the same objects, not others since made at those addresses
            if r is not None and r() is not t:
                return self._make(k, tensors, statics, compute)
        if p.table is not None and p.table.raw != p.table_bytes:  # a table changed in place (even through .data)
            return self._make(k, tensors, statics, compute)
        return p

    def _make(self, key: tuple, tensors: tuple, statics: tuple, compute: str) -> Prepared | None:
        p = None
        if _weights_ok(self.family, tensors, statics, compute):
            p = self._prepare(tensors, statics, compute)
        if p is not None:
            p.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        if len(self._cache) > 1024:  # bounded: a process may see many weights come and go
            self._cache.clear()
        self._cache[key] = p
        return p

    def linear(self, x: Tensor, tensors: Sequence[Tensor | None], bias: Tensor | None, statics: tuple[int, ...],
               compute: str) -> Tensor | None:  # fmt: skip
        """``y = x @ W^T + bias`` through the prepared call, or None: the caller runs the regular kernel.

        The caller is below autograd (or needs no grad) and dispatch (plain CPU tensors, no mode).
        """
        if not _x_ok(x):
            return None
        p = self.prepared(tensors, statics, compute)
        shape = x.shape
        if p is None or not shape or shape[-1] != p.k or _PKG._force_portable:
            return None
        n = p.n
        m = x.numel() // p.k
        if m <= 0 or (p.limit is not None and m > getattr(_PKG, p.limit)):
            return None
        if bias is None:
            bp = None
        elif _bias_ok(bias, n):
            bp = bias.data_ptr()
        else:
            return None
        y = torch.empty(m, n) if len(shape) == 2 else torch.empty((*shape[:-1], n))  # allocated in shape: no view
        yp = y.data_ptr()
        rc = p.call(x.data_ptr(), m, bp, yp, torch.get_num_threads())
        if rc != 0:
            if rc == TABLE_CHANGED and p.checked:  # the next call prepares again (this one: the regular kernel)
                self._cache.clear()
                self._front.clear()
            return None
        if not p.checked and not _LIB.qb_all_finite(yp, m * n):  # the regular kernel redoes what overflowed
            return None
        return y


def group_linear(fast: FastKernel, x: Tensor, tensors: Sequence[Tensor | None], ints: Sequence[int],
                 compute: str) -> Tensor | None:  # fmt: skip
    """The outputs ``x @ W_i^T + b_i`` of a group's members (``tensors``: each member's weight tensors then
    its bias; ``ints``: each member's ints), each ``[M, n_i]`` row-major, one after another in one flat
    tensor, from one foreign call (``qbi8_linear_group``, ``qbi16_linear8_packed_group``); or None: the
    caller runs each member's kernel, which computes exactly what this does. Only the int8 compute mode's
    kernels and the int16 mode's packed ones have a group call; the caller is below autograd and dispatch."""
    if not _x_ok(x) or not x.dim():
        return None
    nw, ni = fast._nw, len(fast.family.ints)
    step = nw + 1
    count, k = len(tensors) // step, x.shape[-1]
    if count == 0 or len(tensors) != count * step or len(ints) != count * ni or k <= 0 or _PKG._force_portable:
        return None
    m = x.numel() // k
    if m <= 0:
        return None
    preps, bps = [], []
    call = None
    for i in range(count):
        at = i * step
        p = fast.prepared(tensors[at : at + nw], tuple(ints[i * ni : i * ni + ni]), compute)
        if p is None or p.member is None or p.k != k or (call is not None and p.group_call is not call):
            return None
        call = p.group_call
        b = tensors[at + nw]
        if b is None:
            bps.append(None)
        elif _bias_ok(b, p.n):
            bps.append(b.data_ptr())
        else:
            return None
        preps.append(p)
    key = (*preps, *bps)
    entry = _GROUPS.get(key)
    if entry is None:  # the members' descriptors stay valid while their Prepared objects (the key) live
        if len(_GROUPS) > 256:
            _GROUPS.clear()
        refs = tuple(r for p in preps for r in p.member_refs)
        entry = _GROUPS[key] = (_group_members(preps, bps), refs, sum(p.n for p in preps))
    members, refs, total = entry
    alive = [r() for r in refs]  # held through the call: the buffers the members point into
    if any(a is None for a in alive):  # (not ``None in alive``: that compares each tensor with None)
        _GROUPS.pop(key, None)
        return None
    y = torch.empty(m * total)
    rc = call(members, count, k, x.data_ptr(), m, y.data_ptr(), torch.get_num_threads())  # type: ignore[misc]
    if rc != 0:
        if rc == TABLE_CHANGED:  # the members' own calls prepare again
            fast._cache.clear()
            fast._front.clear()
            _GROUPS.clear()
        return None
    return y


def _group_members(preps: list[Prepared], bps: list[int | None]) -> ctypes.Array:
    arr = (type(preps[0].member) * len(preps))(*(p.member for p in preps))  # copies of the members' fields
    for i, b in enumerate(bps):
        arr[i].bias = b
    return arr


#: (the members' Prepared objects, their bias addresses) -> (the C array of the group's members, weak
#: references to the buffers they point into, the members' output widths added up)
_GROUPS: dict[tuple, tuple[ctypes.Array, tuple[weakref.ref, ...], int]] = {}


def _x_ok(x: Tensor) -> bool:
    """x as the prepared kernels read it: a contiguous fp32 CPU tensor."""
    return x.dtype is _F32 and x.is_cpu and x.layout is _STRIDED and x.is_contiguous()


def _bias_ok(bias: Tensor, n: int) -> bool:
    """A bias the prepared kernels read: n contiguous fp32 values on the CPU."""
    return bias.dtype is _F32 and bias.is_cpu and bias.is_contiguous() and bias.numel() == n


_F32, _STRIDED = torch.float32, torch.strided
#: a checked call's code for "the code table baked into the descriptor changed" (qbi8_linear_prepared)
TABLE_CHANGED = -2


def _weights_ok(family: OpFamily, tensors: tuple, statics: tuple, compute: str) -> bool:
    """Whether the op's validation accepts these weights (with a stand-in fp32 x): else the regular
    kernel runs and raises its error. Also: every weight tensor a contiguous CPU tensor."""
    if any(t is not None and (type(t) is not torch.Tensor or not t.is_cpu or not t.is_contiguous()) for t in tensors):
        return False
    k = statics[1] if len(statics) > 1 else 0
    if not isinstance(k, int) or k <= 0:
        return False
    x = torch.empty(1, k)
    args = (x, *tensors, None, *statics, *((compute,) if family.computes else ()))
    try:
        family.validate(family.bind(args))
    except (TypeError, ValueError):
        return False
    return True


# ---- the prepared kernels, per (kernel, compute) -----------------------------------------------------


_LIB: ctypes.CDLL = None  # type: ignore[assignment]  # set when a first call is prepared (with the library)
_PKG: ModuleType = None  # type: ignore[assignment]  # the CPU package (its switches are read per call); set by find()
# the group calls' C functions (and the int16 module: its switches are read per call); set with a first member
_QBI8_GROUP: Callable[..., int] = None  # type: ignore[assignment]
_QBI16_GROUP: Callable[..., int] = None  # type: ignore[assignment]
_I16: ModuleType = None  # type: ignore[assignment]


def _qb4(L: ctypes.CDLL, q: _build.QW4, n: int, k: int) -> Prepared | None:
    if not q.fast_ok:
        return None
    fn, ref = L.qb4_linear, q.ref

    def call(xp: int, m: int, bp: int | None, yp: int, nt: int, q=q) -> int:  # q: kept alive with the call
        return fn(ref, xp, m, bp, yp, nt, 0)

    return Prepared(call, n, k, "FUSED_MAX_M")


def _codebook_fp32(tensors: tuple, statics: tuple) -> Prepared | None:
    from . import _blocks_ok, _qw4_codebook

    n, k, bs, _ = statics
    if not _blocks_ok(n, k, bs):
        return None
    q, _keep = _qw4_codebook(*tensors, *statics)
    return _qb4(_LIB, q, n, k)


def _int4_fp32(tensors: tuple, statics: tuple) -> Prepared | None:
    from . import _qw4_int4

    q, _keep = _qw4_int4(*tensors, *statics)
    return _qb4(_LIB, q, statics[0], statics[1])


def _int8_fp32(tensors: tuple, statics: tuple) -> Prepared | None:
    L = _LIB
    if not L.qb_has_avx512():
        return None
    codes, scale = tensors
    n, k = statics
    fn, cp, sp = L.qb8_linear, codes.data_ptr(), scale.data_ptr()

    def call(xp: int, m: int, bp: int | None, yp: int, nt: int) -> int:
        return fn(cp, sp, n, k, xp, m, bp, yp, nt, 0)

    return Prepared(call, n, k, "FUSED_MAX_M_INT8")


def _qbi8(q, n: int, k: int, table: Tensor | None = None) -> Prepared | None:
    """The int8-compute call: one foreign call that also compares the code table (the int8 image baked
    into ``q`` was made from its bytes, saved here) and checks the output finite (``qbi8_linear_prepared``)."""
    from . import int8_compute

    L = int8_compute._lib()
    if L is None or not L.qbi8_supported(ctypes.byref(q)):
        return None
    fn, ref = L.qbi8_linear_prepared, ctypes.byref(q)
    tp, nb = (None, 0) if table is None else (table.data_ptr(), table.numel() * table.element_size())
    saved = None if tp is None else (ctypes.c_char * nb).from_buffer_copy((ctypes.c_char * nb).from_address(tp))

    def call(xp: int, m: int, bp: int | None, yp: int, nt: int, q=q, saved=saved) -> int:  # q, saved: kept alive
        # nonzero: rows of x holding NaN/Inf, y not finite, the table changed, ...: the regular kernel runs
        return fn(ref, xp, m, bp, yp, nt, tp, saved, nb)

    p = Prepared(call, n, k, None)
    p.checked = True
    # q and saved live as long as p (the call's defaults hold them): the member's pointers stay valid
    sp = None if saved is None else ctypes.addressof(saved)
    p.member = int8_compute.QI8Member(ctypes.pointer(q), None, tp, sp, nb)
    global _QBI8_GROUP
    _QBI8_GROUP = L.qbi8_linear_group
    p.group_call = _qbi8_group
    return p


def _qbi8_group(members: ctypes.Array, count: int, k: int, xp: int, m: int, yp: int, nt: int) -> int:
    return _QBI8_GROUP(members, count, xp, m, yp, nt)  # each member's descriptor holds K


def _codebook_int8(tensors: tuple, statics: tuple) -> Prepared | None:
    from . import int8_compute

    return _qbi8(int8_compute.codebook_weight(*tensors, *statics), statics[0], statics[1], tensors[5])


def _int4_int8(tensors: tuple, statics: tuple) -> Prepared | None:
    from . import int8_compute

    return _qbi8(int8_compute.int4_weight(*tensors, *statics), statics[0], statics[1])


def _int8_int8(tensors: tuple, statics: tuple) -> Prepared | None:
    from . import int8_compute

    return _qbi8(int8_compute.int8_weight(*tensors, *statics), statics[0], statics[1])


def _int8_int16(tensors: tuple, statics: tuple) -> Prepared | None:
    """int8 weights in "int16" compute on the packed copy of the codes (``int16_compute.packed_weight``,
    which keeps it per codes tensor and frees it with them: held here only weakly, a call finding it gone
    asks for it again)."""
    from . import int16_compute as i16

    lib = i16._lib()
    codes, scale = tensors
    n, k = statics
    if lib is None or lib[1] != i16.ISA_AVX512_VNNI or scale.dtype is not _F32:
        return None
    packed = i16.packed_weight(codes, n, k)
    if packed is None:
        return None
    fn, sp, cref = lib[0].qbi16_linear8_packed, scale.data_ptr(), weakref.ref(codes)
    ref = weakref.ref(packed)

    def call(xp: int, m: int, bp: int | None, yp: int, nt: int) -> int:
        nonlocal ref
        p = ref()
        if p is None and (c := cref()) is not None:  # the cache let the copy go: made again, as the regular path does
            p = i16.packed_weight(c, n, k)
            ref = weakref.ref(p) if p is not None else ref
        if p is None or not i16.PACKING:
            return 1
        # the kernel's count of rows of x holding NaN/Inf: any, and the regular kernel handles them
        return fn(p.data_ptr(), sp, n, k, xp, m, bp, yp, nt, i16._block())

    p = Prepared(call, n, k, None)
    # a group member on the copy made now (remade later for the single call: that group's calls run its members)
    p.member = i16.QI16Member(packed.data_ptr(), sp, None, n)
    p.member_refs = (weakref.ref(packed),)  # the scale: one of the weight tensors prepared() checked
    global _QBI16_GROUP, _I16
    _QBI16_GROUP, _I16 = lib[0].qbi16_linear8_packed_group, i16
    p.group_call = _qbi16_group
    return p


def _qbi16_group(members: ctypes.Array, count: int, k: int, xp: int, m: int, yp: int, nt: int) -> int:
    return _QBI16_GROUP(members, count, k, xp, m, yp, nt, _I16._block()) if _I16.PACKING else 1


#: (kernel, compute mode) -> prepare(tensors, statics): the cases with a prepared call
_PREPARE: dict[tuple[str, str], Callable[[tuple, tuple], Prepared | None]] = {
    ("codebook", "fp32"): _codebook_fp32,
    ("int4", "fp32"): _int4_fp32,
    ("int8", "fp32"): _int8_fp32,
    ("codebook", "int8"): _codebook_int8,
    ("int4", "int8"): _int4_int8,
    ("int8", "int8"): _int8_int8,
    ("int8", "int16"): _int8_int16,
}


class W8A8Fast:
    """The fast form of ``w8a8_linear``'s CPU kernel: :func:`.w8a8.fast_linear` (no per-call validation or
    conversions; it checks what it relies on), else the regular kernel. The one thing prepared per weight,
    the packed copy of the codes, is kept by :func:`.w8a8.packed_weight` (keyed as the prepared calls
    above: address, version counter, the same object)."""

    def __init__(self, direct: _Kernel) -> None:
        from .w8a8 import fast_linear  # here, not per call: an import statement costs ~1 us

        self.direct = direct
        self._fast_linear = fast_linear
        self.__name__ = "w8a8_linear_fast_kernel"

    def __call__(self, *args: object, **kwargs: object) -> Tensor:
        y = self.linear_args(*args) if not kwargs and len(args) == 7 else None
        return self.direct(*args, **kwargs) if y is None else y

    def linear_args(self, *args: object) -> Tensor | None:
        """The op's positional arguments (x, codes, scale, bias, act_scale, out_features, in_features) through
        the fast call, or None: the caller runs the regular kernel."""
        x, codes, scale, bias, act_scale, n, k = args
        if type(x) is not torch.Tensor or type(codes) is not torch.Tensor or type(scale) is not torch.Tensor:
            return None
        if not (type(n) is int and type(k) is int):
            return None
        return self._fast_linear(x, codes, scale, bias, act_scale, n, k)  # type: ignore[arg-type]


def find(op_name: str, direct: _Kernel) -> FastKernel | W8A8Fast | None:
    """The fast form of ``direct`` (op ``op_name``'s direct CPU kernel), or None: no prepared call for
    that op, or the C++ kernels switched off. The library itself loads (and may compile) on the first
    call, not here at import."""
    global _PKG
    if op_name == "w8a8_linear" and not _build.disabled():
        return W8A8Fast(direct)
    family = next((f for f in FAMILIES.values() if f.op_name == op_name), None)
    if _build.disabled() or family is None or not any(kernel == family.kernel for kernel, _ in _PREPARE):
        return None
    if not family.computes or family.extras or family.floats:  # not the weight-only signature
        return None
    _PKG = sys.modules[__name__.rpartition(".")[0]]

    def prepare(tensors: tuple, statics: tuple, compute: str) -> Prepared | None:
        global _LIB
        make = _PREPARE.get((family.kernel, compute))
        if make is None or (L := _build.load()) is None:  # no library (a failed build): the regular kernel
            return None
        _LIB = L
        return make(tensors, statics)

    return FastKernel(family, direct, prepare)

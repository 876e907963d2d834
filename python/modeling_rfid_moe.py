"""transformers modelling code for checkpoints written by `rfid-moe compress` (docs/FORMAT.md).

Each family's own transformers classes are reused unchanged except for the routed experts of
every MoE layer, which become factored experts whose parameters carry the checkpoint's tensor
names: per-expert coefficients `experts.{j}.{m}.lowrank_a`, shared group bases
`expert_groups.{g}.{m}.basis`, optional residual coefficients `expert_groups.{g}.{m}.residual_eta`,
members of dense groups `experts.{j}.{m}.weight` and `experts.{j}.down_proj.weight`; a factored
`down_proj` has `experts.{j}.down_proj.lowrank_c` and an output-side basis
`expert_groups.{g}.down_proj.basis` [d, rank]. No dense copy of a factored expert is ever held:
`W_j x = A_j (act(B_g) x) + R_j x`, with the residual `R_j` rebuilt for the routed experts only, on
the fly, from the seeded hash of `src/residual.rs`; `down_j h = U_g (C_j h)`, `U_g` applied once
per group to the weighted sum of its routed members.
Each group record says how its factors (or each of its dense members) are stored (`storage`;
records without it: `compression.factor_storage` for the factors and the dense members of the
matrices it lists); `int8-row128` tensors are int8 codes plus `{name}_scale` (docs/FORMAT.md
"Int8 factors"): they stay int8 parameters (with f32 scale buffers) in memory and each is
dequantised to the activations' dtype when a forward uses it, so the int8 storage saves memory
too.

Members of dense groups whose `storage` names a block format (docs/FORMAT.md "Packed block
formats") are stored packed: `experts.{j}.{m}.weight.{scheme}`, uint8 [rows, row_bytes], each row
a run of fixed-size blocks of `block_columns` columns. They stay uint8 parameters under that name
and are dequantised per use, as int8 ones are: per sub-block of columns a step, a code bias and
an offset, `value = step · (code − bias) + offset` in f32 in that order (what rfid-moe's
`src/quant` and candle's port of ggml compute, bit for bit), then the activations' dtype. The
formats:

- `int<bits>-g<group>-<sym|asym>` (bits 2, 3, 4, 5, 6, 8; group 32, 64, 128, 256), one block per
  group: bf16 scale (2 bytes LE), a u8 zero point when asymmetric, then `group · bits / 8` bytes of
  codes, packed least significant bit first (code i occupies bits `i·bits …` of the run). Step =
  scale, bias = `2^(bits−1)` (sym) or the zero point (asym), offset +0.0.
- ggml's blocks, bytes as ggml's `block_*` structs (f16 scales `d`, `dmin`, `m` LE); offset −0.0
  where the format has none:
  `q8_0` (32 columns, 34 bytes: d, 32 i8; step d, bias 128 on `i8 + 128`),
  `q4_0` (32, 18: d, 16 bytes of nibbles, column j low / j+16 high; step d, bias 8),
  `q4_1` (32, 20: d, m, nibbles; step d, bias 0, offset m),
  `q5_0` (32, 22: d, qh u32 fifth bits, nibbles; step d, bias 16),
  `q5_1` (32, 24: d, m, qh, nibbles; step d, bias 0, offset m),
  `q2_k` (256, 84: 16 scale bytes (low nibble scale, high nibble min), 64 bytes of 2-bit codes, d,
  dmin; sub-blocks of 16: step d·sc, bias 0, offset −(dmin·m)),
  `q3_k` (256, 110: 32 bytes of high bits, 64 of 2-bit codes, 12 of packed 6-bit scales, d;
  sub-blocks of 16: step d·(sc − 32), bias 4),
  `q4_k` (256, 144: d, dmin, 12 bytes of packed 6-bit scales and mins, 128 of nibbles;
  sub-blocks of 32: step d·sc, bias 0, offset −(dmin·m)),
  `q5_k` (256, 176: as q4_k with 32 bytes of fifth bits before the nibbles),
  `q6_k` (256, 210: 128 bytes of low nibbles, 64 of high 2 bits, 16 i8 scales, d; sub-blocks of
  16: step d·sc, bias 32).
A storage name this file does not know raises, naming the tensor and the storage.

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`.
"""

import re

import torch
from torch import nn
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_ENTRY_MULTIPLIER = 0xD6E8FEB86659FD93
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_INT8_STORAGE, _INT8_BLOCK, _INT8_SCALE = "int8-row128", 128, "_scale"


def _splitmix64_int(x):
    """SplitMix64 of one Python integer (src/rng.rs)."""
    z = (x + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def _signed(constant):
    """The int64 with the same 64 bits as an unsigned constant."""
    return constant - (1 << 64) if constant >= 1 << 63 else constant


def _shift_right(x, bits):
    """Logical right shift of int64 tensors holding unsigned 64-bit values."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x):
    """SplitMix64 of an int64 tensor (two's-complement wrapping arithmetic = u64 arithmetic)."""
    z = x + _signed(_GOLDEN_GAMMA)
    z = (z ^ _shift_right(z, 30)) * _signed(_MIX1)
    z = (z ^ _shift_right(z, 27)) * _signed(_MIX2)
    return z ^ _shift_right(z, 31)


def residual_buckets(seed, first_entry, entries, size, device):
    """Buckets `π(t)` of entries `first_entry..first_entry+entries` (docs/FORMAT.md, residual)."""
    if not 0 < size < 1 << 31:
        raise ValueError(f"residual size {size} outside 1..2^31")
    salt = _signed(_splitmix64_int(seed))
    t = torch.arange(first_entry, first_entry + entries, dtype=torch.int64, device=device)
    h = _splitmix64(t * _signed(_ENTRY_MULTIPLIER) ^ salt)
    high, low = _shift_right(h, 32), h & 0xFFFFFFFF
    # ⌊h·size / 2⁶⁴⌋ from 32-bit halves, which cannot overflow for size < 2³¹.
    return (high * size + ((low * size) >> 32)) >> 32


# Packed block formats (docs/FORMAT.md "Packed block formats"). Each format's grid reader takes
# a matrix's blocks as uint8 [rows, blocks, block_bytes] and gives per sub-block the step, the
# code bias and the offset, and per column the code; `PackedScheme.dequantise` combines them.
_INT_BITS, _INT_GROUPS = (2, 3, 4, 5, 6, 8), (32, 64, 128, 256)
_FLOAT_STORAGE = ("bf16", "f16", "f32", "f64", "f8_e4m3", "f8_e5m2")


def _half(blocks, at, dtype=torch.float16):
    """The 16-bit float (`dtype`, little-endian) at byte `at` of every block, as f32
    [rows, blocks, 1]."""
    return blocks[..., at : at + 2].contiguous().view(dtype).float()


def _shifted(data, shifts, mask):
    """`(data >> shift) & mask` for each shift, the shifts on a new axis before the last."""
    shifts = torch.tensor(shifts, dtype=torch.uint8, device=data.device)
    return (data.unsqueeze(-2) >> shifts.view(-1, 1)) & mask


def _flat(codes, columns):
    """Codes of `_shifted` runs as [rows, blocks, columns], in column order."""
    return codes.reshape(*codes.shape[:2], columns)


def _nibbles(qs):
    """Legacy 32-column blocks: column j in the low nibble of byte j, j + 16 in the high."""
    return torch.cat([qs & 0xF, qs >> 4], dim=-1)


def _bit_planes(data):
    """Bit k of byte l at column 32·k + l (ggml's high bits of K kinds: `hmask`, `qh`)."""
    return _flat(_shifted(data, range(8), 1), 8 * data.shape[-1])


def _fifth_bits(qh):
    """Q5_0/Q5_1: column c's fifth bit is bit c of the little-endian u32 `qh`."""
    bits = (qh.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=qh.device)) & 1
    return _flat(bits, 32) << 4


def _k_pairs(qs):
    """Q2_K/Q3_K low two bits: per half of 128 columns 32 bytes, runs of 32 at shifts 0, 2, 4, 6."""
    return _flat(_shifted(qs.unflatten(-1, (2, 32)), (0, 2, 4, 6), 3), 256)


def _k_nibbles(qs):
    """Q4_K/Q5_K low four bits: per run of 64 columns 32 bytes, the first 32 in the low nibbles."""
    return _flat(_shifted(qs.unflatten(-1, (4, 32)), (0, 4), 0xF), 256)


def _k4_scales(s):
    """Q4_K/Q5_K's eight 6-bit scales and minimums from their 12 packed bytes (get_scale_min_k4)."""
    scales = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)], -1)
    mins = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return scales.float(), mins.float()


def _q3_scales(s):
    """Q3_K's sixteen 6-bit scales (stored plus 32) from their 12 packed bytes."""
    low = torch.cat([s[..., 0:8] & 0xF, s[..., 0:8] >> 4], dim=-1)
    high = _flat(_shifted(s[..., 8:12], (0, 2, 4, 6), 3), 16)
    return (low | (high << 4)).float()


def _q8_0(b):
    return _half(b, 0), 128.0, -0.0, b[..., 2:34] ^ 0x80


def _q4_0(b):
    return _half(b, 0), 8.0, -0.0, _nibbles(b[..., 2:18])


def _q4_1(b):
    return _half(b, 0), 0.0, _half(b, 2), _nibbles(b[..., 4:20])


def _q5_0(b):
    return _half(b, 0), 16.0, -0.0, _nibbles(b[..., 6:22]) | _fifth_bits(b[..., 2:6])


def _q5_1(b):
    return _half(b, 0), 0.0, _half(b, 2), _nibbles(b[..., 8:24]) | _fifth_bits(b[..., 4:8])


def _q2_k(b):
    d, dmin, sc = _half(b, 80), _half(b, 82), b[..., 0:16]
    return d * (sc & 0xF).float(), 0.0, -(dmin * (sc >> 4).float()), _k_pairs(b[..., 16:80])


def _q3_k(b):
    step = _half(b, 108) * (_q3_scales(b[..., 96:108]) - 32.0)
    return step, 4.0, -0.0, _k_pairs(b[..., 32:96]) | (_bit_planes(b[..., 0:32]) << 2)


def _q4_k(b):
    (d, dmin), (sc, m) = (_half(b, 0), _half(b, 2)), _k4_scales(b[..., 4:16])
    return d * sc, 0.0, -(dmin * m), _k_nibbles(b[..., 16:144])


def _q5_k(b):
    (d, dmin), (sc, m) = (_half(b, 0), _half(b, 2)), _k4_scales(b[..., 4:16])
    codes = _k_nibbles(b[..., 48:176]) | (_bit_planes(b[..., 16:48]) << 4)
    return d * sc, 0.0, -(dmin * m), codes


def _q6_k(b):
    low = _flat(_shifted(b[..., 0:128].unflatten(-1, (2, 64)), (0, 4), 0xF), 256)
    high = _flat(_shifted(b[..., 128:192].unflatten(-1, (2, 32)), (0, 2, 4, 6), 3), 256)
    step = _half(b, 208) * b[..., 192:208].contiguous().view(torch.int8).float()
    return step, 32.0, -0.0, low | (high << 4)


# name: (columns per block, bytes per block, columns per sub-block, dequantiser)
_GGML = {
    "q8_0": (32, 34, 32, _q8_0),
    "q4_0": (32, 18, 32, _q4_0),
    "q4_1": (32, 20, 32, _q4_1),
    "q5_0": (32, 22, 32, _q5_0),
    "q5_1": (32, 24, 32, _q5_1),
    "q2_k": (256, 84, 16, _q2_k),
    "q3_k": (256, 110, 16, _q3_k),
    "q4_k": (256, 144, 32, _q4_k),
    "q5_k": (256, 176, 32, _q5_k),
    "q6_k": (256, 210, 16, _q6_k),
}


def _int_codes(packed, bits, group):
    """`group` codes of `bits` bits packed least significant bit first."""
    if 8 % bits == 0:
        shifts = range(0, 8, bits)
        return _flat(_shifted(packed, shifts, (1 << bits) - 1).transpose(-1, -2), group)
    planes = _flat(_shifted(packed, range(8), 1).transpose(-1, -2), 8 * packed.shape[-1])
    weights = 1 << torch.arange(bits, dtype=torch.int32, device=packed.device)
    return (planes.unflatten(-1, (group, bits)).int() * weights).sum(-1)


class PackedScheme:
    """A block format (`int4-g128-asym`, `q4_k`, …): its block geometry and dequantiser."""

    def __init__(self, name):
        self.name = name.lower()  # ggml's names are read case-insensitively, as rfid-moe does
        if self.name in _GGML:
            self.block_columns, self.block_bytes, self.sub_columns, self._grid = _GGML[self.name]
            return
        match = re.fullmatch(r"int([0-9]+)-g([0-9]+)-(sym|asym)", name)
        bits, group = (int(match[1]), int(match[2])) if match else (None, None)
        if bits not in _INT_BITS or group not in _INT_GROUPS:
            raise ValueError(f"{name!r} is not a block format")
        kind = match[3]
        self.name = f"int{bits}-g{group}-{kind}"
        self.bits, self.symmetric = bits, kind == "sym"
        self.block_columns = self.sub_columns = group
        self.block_bytes = 2 + (not self.symmetric) + group * bits // 8
        self._grid = self._int_grid

    def _int_grid(self, b):
        step = _half(b, 0, torch.bfloat16)
        if self.symmetric:
            bias, packed = float(1 << (self.bits - 1)), b[..., 2:]
        else:
            bias, packed = b[..., 2:3].float(), b[..., 3:]
        return step, bias, 0.0, _int_codes(packed, self.bits, self.block_columns)

    def row_bytes(self, cols):
        """Bytes of one stored row of `cols` columns (whole blocks)."""
        return cols // self.block_columns * self.block_bytes

    def dequantise(self, blocks):
        """The f32 [rows, cols] matrix that packed uint8 [rows, row_bytes] stands for."""
        rows, row_bytes = blocks.shape
        b = blocks.view(rows, row_bytes // self.block_bytes, self.block_bytes)
        step, bias, offset, codes = self._grid(b)
        codes = codes.unflatten(-1, (-1, self.sub_columns)).float()
        if isinstance(bias, torch.Tensor):
            bias = bias.unsqueeze(-1)
        if isinstance(offset, torch.Tensor):
            offset = offset.unsqueeze(-1)
        values = step.unsqueeze(-1) * (codes - bias) + offset
        return values.reshape(rows, -1)


def packed_scheme(storage):
    """The block format a `storage` entry names, or None when it names none."""
    try:
        return PackedScheme(storage)
    except ValueError:
        return None


def _make_int8(module, name):
    """Makes parameter `name` of `module` an int8 one (its codes [rows, cols]) with f32 row-block
    scales `{name}_scale` [rows, ⌈cols/128⌉] beside it as a buffer, so that both load as stored;
    `_weight` dequantises them per use."""
    rows, cols = getattr(module, name).shape
    codes = torch.empty(rows, cols, dtype=torch.int8)
    setattr(module, name, nn.Parameter(codes, requires_grad=False))
    blocks = -(-cols // _INT8_BLOCK)
    module.register_buffer(name + _INT8_SCALE, torch.empty(rows, blocks, dtype=torch.float32))
    module.int8_parameters = getattr(module, "int8_parameters", ()) + (name,)


def _weight(module, name, dtype):
    """The dense value of parameter `name` of `module` in `dtype`: the parameter itself, or for
    an int8 one `code · scale` of its 128-column block, or for a packed member its blocks
    dequantised, in f32 then `dtype` (what rfid-moe's runtime computes, bit for bit)."""
    if isinstance(module, _PackedDense):
        return module.scheme.dequantise(module.blocks()).to(dtype)
    param = getattr(module, name)
    if name not in getattr(module, "int8_parameters", ()):
        return param
    scale = getattr(module, name + _INT8_SCALE).float()
    blocks = scale.repeat_interleave(_INT8_BLOCK, dim=1)[:, : param.shape[1]]
    return (param.float() * blocks).to(dtype)


class _Coefficients(nn.Module):
    """A factored member's coefficients `A_j` [out, rank] (`lowrank_a`)."""

    def __init__(self, rows, rank):
        super().__init__()
        self.lowrank_a = nn.Parameter(torch.empty(rows, rank))


class _Dense(nn.Module):
    """A matrix kept dense (`weight` [out, in]): dense groups' members and every `down_proj`."""

    def __init__(self, rows, cols):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols))


class _PackedDense(nn.Module):
    """A dense member stored in a block format: its blocks `weight.{scheme}` (uint8
    [rows, row_bytes], the stored tensor's name), dequantised per use by `_weight`."""

    def __init__(self, scheme, rows, cols, tensor):
        super().__init__()
        if cols % scheme.block_columns:
            raise ValueError(
                f"{tensor}: storage {scheme.name!r} needs whole blocks of "
                f"{scheme.block_columns} columns; the matrix has {cols}"
            )
        self.scheme, self.shape = scheme, (rows, cols)
        self.weight = nn.Module()  # so that the blocks' name is `weight.{scheme}`
        blocks = torch.empty(rows, scheme.row_bytes(cols), dtype=torch.uint8)
        self.weight.register_parameter(scheme.name, nn.Parameter(blocks, requires_grad=False))

    def blocks(self):
        """The stored blocks, uint8 [rows, row_bytes]."""
        return getattr(self.weight, self.scheme.name)


class _GroupFactors(nn.Module):
    """A group's shared basis `B_g` [rank, in] and optional residual coefficients η."""

    def __init__(self, rank, cols, residual_size):
        super().__init__()
        self.basis = nn.Parameter(torch.empty(rank, cols))
        if residual_size > 0:
            self.residual_eta = nn.Parameter(torch.empty(residual_size))
        self.bucket_scale = None  # 1/√n_q per bucket, computed at first use (seed only)


class _OutputCoefficients(nn.Module):
    """A factored `down_proj` member's coefficients `C_j` [rank, in] (`lowrank_c`)."""

    def __init__(self, rank, cols):
        super().__init__()
        self.lowrank_c = nn.Parameter(torch.empty(rank, cols))


class _OutputBasis(nn.Module):
    """A `down_proj` group's shared output-side basis `U_g` [out, rank]: `W_j = U_g C_j`."""

    def __init__(self, rows, rank):
        super().__init__()
        self.basis = nn.Parameter(torch.empty(rows, rank))


class FactoredExperts(nn.ModuleList):
    """The routed experts of one MoE layer in rfid-moe's factored form (children named by index)."""

    def __init__(self, original, names, layer_record, compression, prefix):
        """`prefix`: the MoE block's state-dict name (`model.layers.{i}.mlp`), for errors."""
        n, p, d = original.num_experts, original.intermediate_dim, original.hidden_dim
        super().__init__([nn.Module() for _ in range(n)])
        self.act_fn = original.act_fn
        self.names, self.num_experts, self.shape = names, n, (p, d)
        self.silu_basis = compression.get("basis_activation", "identity") == "silu"
        self.residual_seed = int(compression.get("residual_seed", 0))
        storage = compression.get("factor_storage")
        if storage not in (None, _INT8_STORAGE):
            raise NotImplementedError(f"factor_storage {storage!r} (this file reads int8-row128)")
        self.factor_storage = storage
        matrices = (layer_record or {}).get("matrices", {})
        # Registered on the MoE block as `expert_groups` (the checkpoint's names), not here.
        object.__setattr__(self, "groups", nn.ModuleList())
        self.member_of = {}  # (matrix, factored expert) → (group index, slot, group size)
        self.down_member_of = {}  # factored down expert → (group index, slot)
        for name in names:
            dense_int8 = set()  # members of dense groups stored as int8 codes
            packed = {}  # members of dense groups stored packed → their block format
            for g, group in enumerate(matrices.get(name, {}).get("groups", [])):
                if not group["dense"]:
                    self._check_storage(group, f"{prefix}.expert_groups.{g}.{name}.basis")
                    if name == names[2]:
                        self._add_down_group(name, g, group)
                    else:
                        self._add_factored_group(name, g, group)
                    continue
                for slot, j in enumerate(group["experts"]):
                    kind = self._check_storage(group, f"{prefix}.experts.{j}.{name}.weight", slot)
                    if isinstance(kind, PackedScheme):
                        packed[j] = kind
                    elif self._int8_at(group, slot):
                        dense_int8.add(j)
            for j in range(n):  # members of dense groups (or of a layer without a record)
                if (name, j) in self.member_of or (name == names[2] and j in self.down_member_of):
                    continue
                shape = (d, p) if name == names[2] else (p, d)
                if j in packed:
                    tensor = f"{prefix}.experts.{j}.{name}.weight"
                    setattr(self[j], name, _PackedDense(packed[j], *shape, tensor))
                    continue
                setattr(self[j], name, _Dense(*shape))
                if j in dense_int8:
                    _make_int8(getattr(self[j], name), "weight")

    @staticmethod
    def _check_storage(group, tensor, slot=0):
        """What the `storage` entry of member `slot` of `group` (its factors, for a factored
        group) names: a float dtype or nothing (None: as stored), `int8-row128`, or, for a dense
        member, a block format (`PackedScheme`); anything else raises, naming `tensor`."""
        storage = group.get("storage") or []
        entry = storage[0] if len(storage) == 1 and not group["dense"] else None
        if group["dense"] and slot < len(storage):
            entry = storage[slot]
        if entry is None or entry in _FLOAT_STORAGE:
            return None
        if entry == _INT8_STORAGE:
            return _INT8_STORAGE
        scheme = packed_scheme(entry)
        if scheme is not None and group["dense"]:
            return scheme
        known = f"a float dtype or {_INT8_STORAGE!r}"
        if group["dense"]:
            formats = ", ".join(["int<bits>-g<group>-<sym|asym>", *_GGML])
            known = f"a float dtype, {_INT8_STORAGE!r} or a block format ({formats})"
        what = "a dense member" if group["dense"] else "a factored group"
        raise ValueError(
            f"{tensor}: storage {entry!r} is not one this modelling file reads for {what} "
            f"({known})"
        )

    def _int8_at(self, group, slot):
        """Whether member `slot` of `group` (or its factors, for a factored group) is stored as
        int8 codes: the group's own `storage` list, or, in records without one, the record's
        `factor_storage` (which then also covered the dense members of the matrices it lists)."""
        storage = group.get("storage") or []
        if not storage:
            return self.factor_storage == _INT8_STORAGE
        if len(storage) == 1 and not group["dense"]:
            return storage[0] == _INT8_STORAGE
        return slot < len(storage) and storage[slot] == _INT8_STORAGE

    def _add_down_group(self, name, g, group):
        """A factored `down_proj` group: `C_j` per member, `U_g` shared on the output side."""
        p, d = self.shape
        int8 = self._int8_at(group, 0)
        for slot, j in enumerate(group["experts"]):
            setattr(self[j], name, _OutputCoefficients(group["rank"], p))
            if int8:
                _make_int8(getattr(self[j], name), "lowrank_c")
            self.down_member_of[j] = (g, slot)
        while len(self.groups) <= g:
            self.groups.append(nn.Module())
        basis = _OutputBasis(d, group["rank"])
        if int8:
            _make_int8(basis, "basis")
        setattr(self.groups[g], name, basis)

    def _add_factored_group(self, name, g, group):
        p, d = self.shape
        int8 = self._int8_at(group, 0)
        for slot, j in enumerate(group["experts"]):
            setattr(self[j], name, _Coefficients(p, group["rank"]))
            if int8:
                _make_int8(getattr(self[j], name), "lowrank_a")
            self.member_of[(name, j)] = (g, slot, len(group["experts"]))
        while len(self.groups) <= g:
            self.groups.append(nn.Module())
        factors = _GroupFactors(group["rank"], d, group.get("residual_size", 0))
        if int8:
            _make_int8(factors, "basis")
        setattr(self.groups[g], name, factors)

    def _residual(self, factors, slot, members):
        """Member `slot`'s residual [out, in], expanded from η for this call only."""
        eta = factors.residual_eta
        p, d = self.shape
        size, seed = eta.shape[0], self.residual_seed
        if factors.bucket_scale is None or factors.bucket_scale.device != eta.device:
            counts = torch.zeros(size, dtype=torch.int64, device=eta.device)
            for s in range(members):
                buckets = residual_buckets(seed, s * p * d, p * d, size, eta.device)
                counts += torch.bincount(buckets, minlength=size)
            counts = counts.double()
            factors.bucket_scale = torch.where(counts > 0, counts.rsqrt(), 0.0).float()
        buckets = residual_buckets(seed, slot * p * d, p * d, size, eta.device)
        values = eta.float()[buckets] * factors.bucket_scale[buckets]
        return values.view(p, d).to(eta.dtype)

    def _project(self, name, expert, x):
        """`W x` for expert `expert`'s gate or up matrix."""
        module = getattr(self[expert], name)
        if isinstance(module, (_Dense, _PackedDense)):
            return nn.functional.linear(x, _weight(module, "weight", x.dtype))
        g, slot, members = self.member_of[(name, expert)]
        factors = getattr(self.groups[g], name)
        basis = _weight(factors, "basis", x.dtype)
        basis = nn.functional.silu(basis) if self.silu_basis else basis
        coefficients = _weight(module, "lowrank_a", x.dtype)
        out = nn.functional.linear(nn.functional.linear(x, basis), coefficients)
        if hasattr(factors, "residual_eta"):
            out = out + nn.functional.linear(x, self._residual(factors, slot, members))
        return out

    def forward(self, hidden_states, top_k_index, top_k_weights):
        """Same contract as the family's experts module: [tokens, d] → [tokens, d].

        A factored `down_proj` group sums `w_j · C_j h_j` over its routed members into one
        [tokens, rank] buffer and applies its basis once: `U_g Σ_j w_j C_j h_j`.
        """
        final = torch.zeros_like(hidden_states)
        gate, up, down = self.names
        sums = {}  # down group index → Σ_j w_j C_j h_j, [tokens, rank]
        hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            token, position = torch.where(top_k_index == expert)
            x = hidden_states[token]
            h = self.act_fn(self._project(gate, expert, x)) * self._project(up, expert, x)
            weight = top_k_weights[token, position, None]
            module = getattr(self[expert], down)
            if expert in self.down_member_of:
                g = self.down_member_of[expert][0]
                c = nn.functional.linear(h, _weight(module, "lowrank_c", h.dtype)) * weight
                if g not in sums:
                    sums[g] = hidden_states.new_zeros(hidden_states.shape[0], c.shape[1])
                sums[g].index_add_(0, token, c.to(sums[g].dtype))
                continue
            out = nn.functional.linear(h, _weight(module, "weight", h.dtype)) * weight
            final.index_add_(0, token, out.to(final.dtype))
        for g, total in sums.items():
            basis = _weight(getattr(self.groups[g], down), "basis", total.dtype)
            final += nn.functional.linear(total, basis).to(final.dtype)
        return final


class _MixtralBlockSparseMoeLayer(MixtralDecoderLayer):
    """Mixtral's decoder layer with its MoE block under the checkpoint's `block_sparse_moe`."""

    @property
    def mlp(self):
        return self.block_sparse_moe


class _FactoredExpertsModel:
    """Mixin for a family's `ForCausalLM`: routed experts replaced by [`FactoredExperts`]."""

    expert_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, config):
        super().__init__(config)
        compression = getattr(config, "compression", None)
        if not compression or compression.get("method") != "rfid-moe":
            raise ValueError("config.json has no rfid-moe `compression` section")
        if getattr(config, "quantization_config", None):
            raise NotImplementedError(
                "rfid-moe outputs of FP8 checkpoints do not load in transformers yet; "
                "use `rfid-moe compress --export-dense` or rfid-moe itself"
            )
        records = {r["layer"]: r for r in compression.get("layers", [])}
        for index, layer in enumerate(self.model.layers):
            block = self._moe_block(layer)
            if block is not None:
                record = records.get(index)
                attribute = next(n for n, m in layer.named_children() if m is block)
                prefix = f"model.layers.{index}.{attribute}"
                names = self.expert_names
                experts = FactoredExperts(block.experts, names, record, compression, prefix)
                block.experts = experts
                block.expert_groups = experts.groups
        self.post_init()

    def _moe_block(self, layer):
        block = getattr(layer, "mlp", None)
        return block if hasattr(block, "experts") else None

    @classmethod
    def from_pretrained(cls, *args, output_loading_info=False, **kwargs):
        """The family's `from_pretrained`, refusing a checkpoint that leaves any weight missing
        (transformers would initialise it at random); int8 factors stay int8, packed members
        their uint8 blocks."""
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            raise ValueError(
                f"{len(missing)} weights of this rfid-moe checkpoint are missing from its "
                f"safetensors files (first: {missing[:5]}); refusing to initialise them at random"
            )
        return (model, info) if output_loading_info else model


class RfidMoeMixtralConfig(MixtralConfig):
    """Mixtral config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_mixtral"


class RfidMoeMixtralForCausalLM(_FactoredExpertsModel, MixtralForCausalLM):
    """Mixtral with factored routed experts (`block_sparse_moe.experts.{j}.w1/w3/w2`)."""

    config_class = RfidMoeMixtralConfig
    expert_names = ("w1", "w3", "w2")

    def _moe_block(self, layer):
        layer.block_sparse_moe = layer._modules.pop("mlp")
        layer.__class__ = _MixtralBlockSparseMoeLayer
        return layer.block_sparse_moe


class RfidMoeQwen2MoeConfig(Qwen2MoeConfig):
    """Qwen2-MoE config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_qwen2_moe"


class RfidMoeQwen2MoeForCausalLM(_FactoredExpertsModel, Qwen2MoeForCausalLM):
    """Qwen2-MoE with factored routed experts."""

    config_class = RfidMoeQwen2MoeConfig


class RfidMoeQwen3MoeConfig(Qwen3MoeConfig):
    """Qwen3-MoE config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_qwen3_moe"


class RfidMoeQwen3MoeForCausalLM(_FactoredExpertsModel, Qwen3MoeForCausalLM):
    """Qwen3-MoE with factored routed experts."""

    config_class = RfidMoeQwen3MoeConfig


class RfidMoeOlmoeConfig(OlmoeConfig):
    """OLMoE config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_olmoe"


class RfidMoeOlmoeForCausalLM(_FactoredExpertsModel, OlmoeForCausalLM):
    """OLMoE with factored routed experts."""

    config_class = RfidMoeOlmoeConfig


class RfidMoeDeepseekV2Config(DeepseekV2Config):
    """DeepSeek-V2 config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_deepseek_v2"


class RfidMoeDeepseekV2ForCausalLM(_FactoredExpertsModel, DeepseekV2ForCausalLM):
    """DeepSeek-V2 with factored routed experts."""

    config_class = RfidMoeDeepseekV2Config


class RfidMoeDeepseekV3Config(DeepseekV3Config):
    """DeepSeek-V3 config of an rfid-moe compressed checkpoint."""

    model_type = "rfid_moe_deepseek_v3"


class RfidMoeDeepseekV3ForCausalLM(_FactoredExpertsModel, DeepseekV3ForCausalLM):
    """DeepSeek-V3 with factored routed experts."""

    config_class = RfidMoeDeepseekV3Config

"""The language model: a stack of pre-norm blocks, each mixing with Mamba2 or causal attention.

Owns :class:`ModelConfig` (the hybrid is data: ``layer_pattern`` says which layer is which), the
presets, the attention layer with its rotary embedding and KV cache, the block, and :class:`HybridLM`
with its loss, parameter groups, FLOP estimate and cached decoding (:meth:`HybridLM.prefill`,
:meth:`HybridLM.step`, :class:`InferenceCache`). The Mamba2 mixer lives in :mod:`arc.mamba2`; which
compute path it takes is decided in :mod:`arc.kernels`. The model knows nothing of ARC beyond the
vocabulary size.

Precision: parameters are float32; under bf16 autocast the matrix multiplies run in bf16 while the
residual stream, the norms, the scan's decays and ``A_log``/``D``/``dt_bias`` stay float32; cached
decoding (``prefill``/``step``) also keeps its output head in float32.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from arc.config import help_field
from arc.mamba2 import Mamba2, MambaPending, MambaPendingFused, MambaState, init_A_log, init_dt_bias
from arc.loss import mean_loss
from arc.tokens import (BLOCK_SIZE, KIND_INPUT, N_KINDS, N_MAPS, N_POS, POS_ALIGN, POS_COL, POS_KIND, POS_MAPS, POS_MCOL,
                        POS_MROW, POS_ROW, POS_SIZE, VOCAB_SIZE, column_order)

MAMBA, ATTENTION = "M", "A"
ROWS, COLUMNS = "r", "c"  # mamba_scan's letters
SCANS = (ROWS, COLUMNS)


# ---- config -------------------------------------------------------------------------------------
GRID_ROPE_BASE = 100.0  # rows and columns run 0..31: a short range needs a small base
# --rope: what each part of a head's dims rotates by, per group of heads (the heads split evenly
# between the groups). A part rotates by the sequence index (None) or by a 2D channel of arc.tokens,
# given as (the channel an input grid's tokens use, the channel every other token uses).
RopePart = tuple[int, int] | None
_ROW, _COL, _MROW, _MCOL = ((c, c) for c in (POS_ROW, POS_COL, POS_MROW, POS_MCOL))
ROPE_GROUPS: dict[str, tuple[tuple[RopePart, ...], ...]] = {
    "seq": ((None,),),
    "grid": ((None, _ROW, _COL),),
    "mirror": ((None, _ROW, _COL, _MROW, _MCOL),),
    # the mirror heads, and as many heads that see every input grid transposed (an input cell (r, c)
    # placed at row c, column r, and at the far-edge counts W-1-c, H-1-r): "the transposed / rotated
    # cell of the input" is then a fixed relative offset too: each of the 8 rotations and reflections
    # is one in some head (docs/BENCHMARKS.md section 17 measures it; the presets keep "mirror")
    "dihedral": ((None, _ROW, _COL, _MROW, _MCOL),
                 (None, (POS_COL, POS_ROW), (POS_ROW, POS_COL), (POS_MCOL, POS_ROW), (POS_MROW, POS_COL))),
}


@dataclass
class ModelConfig:
    """The model's shape. Saved in every checkpoint (``to_dict``) and rebuilt with ``from_dict``."""

    vocab_size: int = help_field(VOCAB_SIZE, "number of token ids (the ARC vocabulary by default)")
    d_model: int = help_field(256, "width of the residual stream")
    n_layer: int = help_field(8, "number of blocks")
    layer_pattern: str = help_field("MMMA", "layer kinds, M = Mamba2, A = attention; tiled to n_layer (e.g. 'M' pure Mamba, 'A' GPT)")
    d_state: int = help_field(64, "Mamba2 state size per group (N)")
    headdim: int = help_field(64, "Mamba2 head dimension (P); heads = expand * d_model / headdim")
    expand: int = help_field(2, "Mamba2 inner width = expand * d_model")
    d_conv: int = help_field(4, "Mamba2 causal conv width (2..4 for the causal_conv1d kernel)")
    ngroups: int = help_field(1, "Mamba2 groups sharing B and C (divides the number of Mamba2 heads)")
    chunk_size: int = help_field(64, "Mamba2 SSD chunk length of the GPU kernels and the pure-PyTorch twin (64 is its fastest on CPU, 256 is mamba_ssm's default on GPU; the CPU's C++ scan does not chunk)")
    n_head: int = help_field(4, "attention heads (head dim = d_model / n_head, even for rotary)")
    rope_base: float = help_field(10000.0, "rotary embedding base")
    mlp_hidden: int = help_field(0, "hidden width of a gated MLP after each mixer; 0 = no MLP")
    max_seq_len: int = help_field(BLOCK_SIZE, "longest sequence (prompt + generated tokens) the model accepts")
    dropout: float = help_field(0.0, "dropout on the embedding, mixer/MLP outputs and attention weights")
    tie_embeddings: bool = help_field(True, "share the embedding matrix with the output head")
    # 2D structure, as inputs (arc.tokens computes each token's row, column, grid kind and aligned cell)
    grid_pos: bool = help_field(False, "add learned embeddings of each token's row, column and grid kind (input/output)")
    align_input: bool = help_field(False, "add an embedding of the input cell under the slot an output token's successor fills (same row and column of its pair's input grid)")
    align_maps: bool = help_field(False, "also add embeddings of the input cells that slot reads under each of the 7 other rotations and reflections of the input grid (arc.tokens POS_MAPS)")
    map_agree: bool = help_field(False, "also add, for each output cell, an embedding of which of the 8 rotations and reflections (the identity and align_maps' 7) it agrees with: its colour equals the input cell its own slot reads under that map (the evidence of which map a demonstration shows; needs align_input and align_maps; docs/BENCHMARKS.md section 20: the five maps learnt by 2M, but colour_map and ARC learn slower with it)")
    map_gate: float = help_field(0.0, "with align_maps: scale each map's embedding (and, with map_agree, its agreement row) by rate ** map_gate, rate = the share of the sequence's cells so far, up to this token, that agree with the map (the colour equals the cell the token's slot reads under it), among those whose slot reads a cell under it: the demonstrations open the map they show and keep the others out of the residual stream; 0 = off (docs/BENCHMARKS.md section 21)")
    mamba_scan: str = help_field("r", "the order each Mamba2 layer reads the sequence in, one letter per Mamba2 layer (cycled over them): r = as written (row by row); c = every input grid column by column, top to bottom, its ROW tokens as a last column, everything else as written (a column's cells then reach the scan state together; input grids are whole before any output token, so an output token still sees only its past; docs/BENCHMARKS.md section 22: no gain on gravity or the suite at 2-8M tokens, so the presets keep r)")
    rope: Literal["seq", "grid", "mirror", "dihedral"] = help_field("seq", "attention rotary positions: seq = sequence index; grid = half the head dims by sequence index, a quarter by row, a quarter by column; mirror = half by sequence index, an eighth each by row, column, and the row and column counted from an input grid's far edges; dihedral = mirror in half the heads, and in the other half the same with every input grid transposed (so rotations and transpositions are fixed offsets too)")

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, what: str) -> None:
            if not ok:
                raise ValueError(f"ModelConfig.{name} {what}, got {getattr(self, name)!r}")

        for name in ("vocab_size", "d_model", "n_layer", "d_state", "headdim", "expand", "ngroups", "chunk_size",
                     "n_head", "max_seq_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0, name, "must be a positive integer")
        need(isinstance(self.mlp_hidden, int) and self.mlp_hidden >= 0, "mlp_hidden", "must be an integer >= 0")
        need(isinstance(self.d_conv, int) and self.d_conv >= 2, "d_conv", "must be an integer >= 2")
        need(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        need(isinstance(self.rope_base, (int, float)) and self.rope_base > 1.0, "rope_base", "must be > 1")
        for name in ("tie_embeddings", "grid_pos", "align_input", "align_maps", "map_agree"):
            need(isinstance(getattr(self, name), bool), name, "must be a bool")
        need(not self.map_agree or (self.align_input and self.align_maps), "map_agree",
             "needs align_input=True and align_maps=True (it compares a cell with the cells they look up)")
        need(isinstance(self.map_gate, (int, float)) and not isinstance(self.map_gate, bool) and self.map_gate >= 0,
             "map_gate", "must be a number >= 0 (0 = off)")
        need(not self.map_gate or self.align_maps, "map_gate", "needs align_maps=True (it scales the maps' embeddings)")
        need(self.rope in ROPE_GROUPS, "rope", f"must be one of {sorted(ROPE_GROUPS)}")
        need(isinstance(self.mamba_scan, str) and len(self.mamba_scan) > 0 and set(self.mamba_scan) <= set(SCANS),
             "mamba_scan", f"must be a non-empty string of {' and '.join(map(repr, SCANS))}")
        need(isinstance(self.layer_pattern, str) and len(self.layer_pattern) > 0
             and set(self.layer_pattern) <= {MAMBA, ATTENTION}, "layer_pattern", "must be a non-empty string of 'M' and 'A'")
        need(self.n_layer % len(self.layer_pattern) == 0, "layer_pattern",
             f"must tile n_layer={self.n_layer} (its length must divide n_layer)")
        if MAMBA in self.layer_pattern:
            d_inner = self.expand * self.d_model
            need(d_inner % self.headdim == 0, "headdim", f"must divide expand * d_model = {d_inner}")
            need((d_inner // self.headdim) % self.ngroups == 0, "ngroups",
                 f"must divide the number of Mamba2 heads {d_inner // self.headdim}")
        if ATTENTION in self.layer_pattern:
            need(self.d_model % self.n_head == 0, "n_head", f"must divide d_model={self.d_model}")
            groups = ROPE_GROUPS[self.rope]
            parts = len(groups[0])  # half the head dims by sequence, the rest split evenly; all even
            step = 2 if parts == 1 else 4 * (parts - 1)
            need((self.d_model // self.n_head) % step == 0, "n_head",
                 f"must leave a head dim divisible by {step} for --rope {self.rope}")
            need(self.n_head % len(groups) == 0, "n_head",
                 f"must split evenly into the {len(groups)} head groups of --rope {self.rope}")

    @property
    def reads_before(self) -> bool:
        """Whether a token's input also compares it with the cells its own slot reads (the previous
        token's looked-up cells): map_agree and map_gate do."""
        return self.map_agree or self.map_gate > 0

    @property
    def uses_positions(self) -> bool:
        """True when the model needs the 2D position channels of arc.tokens with its ids."""
        return self.grid_pos or self.align_input or self.align_maps or self.rope != "seq" or COLUMNS in self.mamba_scan

    @property
    def column_scans(self) -> list[bool]:
        """One flag per layer: True for a Mamba2 layer that reads input grids column by column."""
        scans = iter(self.mamba_scan * self.n_layer)  # at most n_layer Mamba2 layers
        return [kind == MAMBA and next(scans) == COLUMNS for kind in self.layer_kinds]

    @property
    def align_channels(self) -> list[int]:
        """The position channels whose offsets point back at input cells the model embeds:
        POS_ALIGN with align_input, then the POS_MAPS channels with align_maps."""
        return [POS_ALIGN] * self.align_input + list(range(POS_MAPS, POS_MAPS + N_MAPS)) * self.align_maps

    @property
    def layer_kinds(self) -> str:
        """One character per layer: the pattern tiled to n_layer."""
        return self.layer_pattern * (self.n_layer // len(self.layer_pattern))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The inverse of :meth:`to_dict`. Unknown keys are an error; missing keys take their defaults."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ModelConfig.from_dict: unknown fields {unknown}")
        return cls(**d)


# The 2D channels every preset takes: the learning benchmark (docs/BENCHMARKS.md, "Learning curves")
# found a 1-D model at 0% on flip_h after 2M tokens where these reach 97%.
GRID_2D: dict[str, Any] = dict(grid_pos=True, align_input=True, rope="mirror")

PRESETS: dict[str, dict[str, Any]] = {
    # tests: both layer kinds and the MLP, a few thousand parameters, milliseconds per step; 1-D, so model
    # tests may feed any ids (the smoke training preset adds GRID_2D)
    "tiny": dict(d_model=32, n_layer=4, layer_pattern="MMAM", d_state=16, headdim=16, n_head=2, chunk_size=16,
                 mlp_hidden=64, max_seq_len=512),
    # the default CPU model: ~3.1M parameters, 6 Mamba2 + 2 attention layers
    "cpu": dict(d_model=256, n_layer=8, layer_pattern="MMMA", d_state=64, headdim=64, n_head=4, chunk_size=64, **GRID_2D),
    # one GPU: ~25M parameters, 12 Mamba2 + 4 attention layers, mamba_ssm's chunk size for the kernels
    "gpu": dict(d_model=512, n_layer=16, layer_pattern="MMMA", d_state=128, headdim=64, n_head=8, chunk_size=256, **GRID_2D),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named ModelConfig (``tiny``, ``cpu``, ``gpu``), with fields overridden by keyword."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---- layers -------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 whatever the autocast dtype; one parameter, ``weight``."""

    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)




def _rotary_table(dim: int, length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (length, dim/2) of the rotate-half rotary embedding for positions 0..length-1."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (dim/2,)
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_freq  # (length, dim/2)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary on float32 x (..., d) with cos/sin broadcastable to (..., d/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Rotary(nn.Module):
    """Rotary position embedding (rotate-half form) over parts of the head dims, each rotated by one
    position: the sequence index or a 2D channel of arc.tokens (:data:`ROPE_GROUPS`, which may give
    each group of heads its own channels). Half the head dims always follow the sequence index. With
    the row and column channels, "the same cell of another grid" is a fixed relative offset whatever
    the distance in the sequence; with the mirrored ones, so is "the mirrored cell of the input"; with
    the transposed ones (``dihedral``), so is the transposed or rotated cell."""

    def __init__(self, head_dim: int, max_seq_len: int, base: float, rope: str = "seq") -> None:
        super().__init__()
        self.groups = ROPE_GROUPS[rope]
        channels = self.groups[0]
        seq_dim = head_dim if len(channels) == 1 else head_dim // 2
        cell_dim = (head_dim - seq_dim) // max(len(channels) - 1, 1)
        self.dims = [seq_dim if c is None else cell_dim for c in channels]  # per part, the same in every group
        # not in the state dict: derived from the config, so checkpoints stay the learned weights only
        cos, sin = _rotary_table(seq_dim, max_seq_len, base)
        self.register_buffer("cos", cos, persistent=False)  # (T_max, seq_dim/2)
        self.register_buffer("sin", sin, persistent=False)
        if len(channels) > 1:
            cos, sin = _rotary_table(cell_dim, POS_SIZE, GRID_ROPE_BASE)
            self.register_buffer("cell_cos", cos, persistent=False)  # (POS_SIZE, cell_dim/2)
            self.register_buffer("cell_sin", sin, persistent=False)
        partner, start = [], 0  # each head dim's rotate-half partner within its part
        for dims in self.dims:
            half = dims // 2
            partner += [start + half + i for i in range(half)] + [start + i for i in range(half)]
            start += dims
        self.register_buffer("partner", torch.tensor(partner), persistent=False)

    def part_tables(self, positions: torch.Tensor, pos: torch.Tensor | None = None,
                    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each head group's parts' (cos, sin) at sequence positions (T,) shared or (B, T) per sequence
        and the 2D channels ``pos`` (B, T, N_POS) when a part uses them: (T, d/2) or (B, 1, T, d/2)."""
        def per_head(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            out = table[index]  # (T, d/2) or (B, T, d/2)
            return out[:, None] if index.dim() == 2 else out  # (B, 1, T, d/2) broadcasts over heads

        seq = (per_head(self.cos, positions), per_head(self.sin, positions))
        out = []
        for parts in self.groups:
            group = []
            for part in parts:
                if part is None:
                    group.append(seq)
                    continue
                in_input, other = part
                index = pos[..., other]  # (B, T)
                if in_input != other:
                    index = torch.where(pos[..., POS_KIND] == KIND_INPUT, pos[..., in_input], index)
                group.append((per_head(self.cell_cos, index), per_head(self.cell_sin, index)))
            out.append(group)
        return out

    def tables(self, positions: torch.Tensor, pos: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole head's (cos, signed sin) for :meth:`apply`, from :meth:`part_tables`: (1 or B,
        groups, 1, T, hd), each part's (cos, cos) and (-sin, sin) side by side, so a rotation is
        ``x * cos + x[..., partner] * sin`` with one pass over x (the queries and keys share them)."""
        cos, sin = [], []
        for group in self.part_tables(positions, pos):
            rank = max(c.dim() for c, _ in group)  # a part per sequence makes the whole group per sequence
            parts = [(c, s) if c.dim() == rank else (c[None, None], s[None, None]) for c, s in group]
            lead = torch.broadcast_shapes(*(c.shape[:-1] for c, _ in parts))
            cos.append(torch.cat([c.expand(*lead, -1) for c, _ in parts for _ in (0, 1)], dim=-1))
            sin.append(torch.cat([t.expand(*lead, -1) for _, s in parts for t in (-s, s)], dim=-1))
        if cos[0].dim() == 2:  # shared (T, hd) -> (1, groups, 1, T, hd)
            return torch.stack(cos)[None, :, None], torch.stack(sin)[None, :, None]
        return torch.stack(cos, dim=1), torch.stack(sin, dim=1)  # (B, 1, T, hd) each -> (B, groups, 1, T, hd)

    def apply(self, x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B, H, T, hd) rotated by :meth:`tables` -> same shape and dtype (head group g is the g-th
        of the groups' equal slices of the H heads). :meth:`apply_reference` is its part-by-part twin."""
        cos, sin = tables
        b, h, t, hd = x.shape
        xf = x.float().reshape(b, cos.shape[1], h // cos.shape[1], t, hd)
        return (xf * cos + xf[..., self.partner] * sin).reshape(b, h, t, hd).to(x.dtype)

    def apply_reference(self, x: torch.Tensor, part_tables: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> torch.Tensor:
        """:meth:`apply`, part by part with :func:`_rotate` over :meth:`part_tables` (the parity twin)."""
        xf, out = x.float(), []
        for xg, group in zip(xf.chunk(len(part_tables), dim=1), part_tables):
            start, parts = 0, []
            for dims, (cos, sin) in zip(self.dims, group):
                parts.append(_rotate(xg[..., start:start + dims], cos, sin))
                start += dims
            out.append(torch.cat(parts, dim=-1))
        return torch.cat(out, dim=1).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, H, T, hd) at sequence positions (T,) shared or (B, T) per sequence, and the 2D channels
        ``pos`` (B, T, N_POS) when a part uses them -> same shape and dtype."""
        return self.apply(x, self.tables(positions, pos))

    def pair(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, pos: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward` of the queries and the keys at the same positions, the tables looked up once."""
        tables = self.tables(positions, pos)
        return self.apply(q, tables), self.apply(k, tables)


@dataclass
class KVCache:
    """An attention layer's decoding state: keys (rotated) and values for every slot of every sequence."""

    k: torch.Tensor  # (B, H, T_max, hd)
    v: torch.Tensor  # (B, H, T_max, hd)

    def select(self, index: torch.Tensor) -> KVCache:
        return KVCache(self.k.index_select(0, index), self.v.index_select(0, index))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention through ``F.scaled_dot_product_attention``, with rotary."""

    def __init__(self, d_model: int, n_head: int, max_seq_len: int, rope_base: float, dropout: float,
                 rope: str = "seq") -> None:
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, d_model // n_head, dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model, bias=False)  # [q, k, v]
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, max_seq_len, rope_base, rope)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) -> q, k, v (B, H, T, hd), not yet rotated."""
        b, t, _ = x.shape
        qkv = self.in_proj(x).view(b, t, 3, self.n_head, self.head_dim)  # (B, T, 3, H, hd)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, return_state: bool = False, pos: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, KVCache | None]:
        """x (B, T, C), 2D channels pos (B, T, N_POS) or None -> (y (B, T, C), the keys and values if
        return_state else None)."""
        b, t, c = x.shape
        q, k, v = self._qkv(x)  # (B, H, T, hd) each
        positions = torch.arange(t, device=x.device)
        q, k = self.rotary.pair(q, k, positions, pos)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        y = self.out_proj(y.transpose(1, 2).reshape(b, t, c))  # (B, T, C)
        return y, (KVCache(k, v) if return_state else None)

    def step(self, x: torch.Tensor, cache: KVCache, lengths: torch.Tensor, pos: torch.Tensor | None = None,
             used: int | None = None) -> torch.Tensor:
        """One token per sequence: x (B, C) at positions ``lengths`` (B,) with 2D channels pos (B, N_POS)
        or None; writes its key and value into slot ``lengths[i]`` of sequence i and attends to slots
        0..lengths[i] only (``used`` = max(lengths) + 1, read from ``lengths`` when not given)."""
        b, c = x.shape
        q, k, v = self._qkv(x[:, None])  # (B, H, 1, hd) each
        p = None if pos is None else pos[:, None]  # (B, 1, N_POS)
        q, k = self.rotary.pair(q, k, lengths[:, None], p)
        rows = torch.arange(b, device=x.device)
        cache.k[rows, :, lengths] = k[:, :, 0].to(cache.k.dtype)  # (B, H, hd) into slot lengths[i]
        cache.v[rows, :, lengths] = v[:, :, 0].to(cache.v.dtype)
        # attend over the slots written so far, not the whole capacity (prompt + every token allowed)
        used = int(lengths.max()) + 1 if used is None else used
        slots = torch.arange(used, device=x.device)
        visible = (slots[None, :] <= lengths[:, None])[:, None, None, :]  # (B, 1, 1, used)
        y = F.scaled_dot_product_attention(q.to(cache.k.dtype), cache.k[:, :, :used], cache.v[:, :, :used],
                                           attn_mask=visible)  # (B, H, 1, hd)
        return self.out_proj(y.reshape(b, c).to(x.dtype))  # (B, C)

    def extend(self, x: torch.Tensor, cache: KVCache, lengths: torch.Tensor, pos: torch.Tensor | None = None,
               used: int | None = None) -> torch.Tensor:
        """T tokens per sequence: x (B, T, C) at positions ``lengths[i] + t`` (2D channels pos (B, T,
        N_POS) or None); writes their keys and values into those slots and attends causally over the
        sequence's slots (``used`` = max(lengths) + T when not given). One read of the cache for T
        tokens; slots past what the caller keeps are overwritten later and never read before."""
        b, t, c = x.shape
        q, k, v = self._qkv(x)  # (B, H, T, hd) each
        where = lengths[:, None] + torch.arange(t, device=x.device)  # (B, T) slot of each token
        q, k = self.rotary.pair(q, k, where, pos)
        rows = torch.arange(b, device=x.device)[:, None]
        cache.k[rows, :, where] = k.transpose(1, 2).to(cache.k.dtype)  # (B, T, H, hd) into slots where[i]
        cache.v[rows, :, where] = v.transpose(1, 2).to(cache.v.dtype)
        used = int(lengths.max()) + t if used is None else used
        slots = torch.arange(used, device=x.device)
        visible = (slots[None, None, :] <= where[:, :, None])[:, None]  # (B, 1, T, used)
        y = F.scaled_dot_product_attention(q.to(cache.k.dtype), cache.k[:, :, :used], cache.v[:, :, :used],
                                           attn_mask=visible)  # (B, H, T, hd)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, c).to(x.dtype))  # (B, T, C)


class GatedMLP(nn.Module):
    """``fc2(a * silu(g))`` where ``[a, g] = fc1(x)`` (mamba_ssm's GatedMLP names)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False)
        self.fc2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.fc1(x).chunk(2, dim=-1)  # (..., hidden) each
        return self.fc2(a * F.silu(gate))


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm2(x))`` when there is an MLP.
    The residual stream ``x`` stays float32 under autocast."""

    def __init__(self, kind: str, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.kind = kind
        self.columns = cfg.column_scans[layer_idx]  # a Mamba2 layer reading input grids column by column
        self.norm = RMSNorm(cfg.d_model)
        if kind == MAMBA:
            self.mixer: nn.Module = Mamba2(cfg.d_model, d_state=cfg.d_state, d_conv=cfg.d_conv, expand=cfg.expand,
                                           headdim=cfg.headdim, ngroups=cfg.ngroups, chunk_size=cfg.chunk_size,
                                           layer_idx=layer_idx)
        else:
            self.mixer = CausalSelfAttention(cfg.d_model, cfg.n_head, cfg.max_seq_len, cfg.rope_base, cfg.dropout,
                                             rope=cfg.rope)
        self.norm2 = RMSNorm(cfg.d_model) if cfg.mlp_hidden else None
        self.mlp = GatedMLP(cfg.d_model, cfg.mlp_hidden) if cfg.mlp_hidden else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, return_state: bool = False, pos: torch.Tensor | None = None,
                columns: tuple[torch.Tensor, torch.Tensor] | None = None,
                ) -> tuple[torch.Tensor, MambaState | KVCache | None]:
        """x (B, T, C) float32, 2D channels pos (B, T, N_POS) or None (attention's grid rotary reads
        them), ``columns`` = :func:`arc.tokens.column_order` of pos (read when this layer scans by
        columns) -> (x (B, T, C) float32, the mixer's decoding state or None)."""
        if self.kind == MAMBA and self.columns:
            order, place = (i[..., None].expand(-1, -1, x.shape[-1]) for i in columns)  # (B, T, C) each
            h, state = self.mixer(self.norm(x).gather(1, order), return_state=return_state)  # in scan order
            h = h.gather(1, place)  # (B, T, C) back in sequence order
        elif self.kind == MAMBA:
            h, state = self.mixer(self.norm(x), return_state=return_state)  # (B, T, C)
        else:
            h, state = self.mixer(self.norm(x), return_state=return_state, pos=pos)  # (B, T, C)
        x = x + self.drop(h).float()
        if self.mlp is not None:
            x = x + self.drop(self.mlp(self.norm2(x))).float()
        return x, state

    def step(self, x: torch.Tensor, state: MambaState | KVCache, lengths: torch.Tensor,
             pos: torch.Tensor | None = None, used: int | None = None) -> torch.Tensor:
        """x (B, C) float32, one token per sequence (2D channels pos (B, N_POS) or None) -> (B, C)
        float32; ``state`` is updated in place; ``used`` = max(lengths) + 1 if the caller knows it."""
        if self.kind == MAMBA:
            h = self.mixer.step(self.norm(x), state)
        else:
            h = self.mixer.step(self.norm(x), state, lengths, pos, used=used)
        x = x + h.float()
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x)).float()
        return x

    def extend(self, x: torch.Tensor, state: MambaState | KVCache, lengths: torch.Tensor,
               pos: torch.Tensor | None = None, used: int | None = None) -> tuple[torch.Tensor, MambaPending | MambaPendingFused | None]:
        """:meth:`step` for T tokens per sequence: x (B, T, C) float32 -> (B, T, C) float32 and, for a
        Mamba2 layer, what committing needs (its state is not changed; an attention layer writes its
        slots)."""
        pending = None
        if self.kind == MAMBA:
            h, pending = self.mixer.extend(self.norm(x), state)
        else:
            h = self.mixer.extend(self.norm(x), state, lengths, pos, used=used)
        x = x + h.float()
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x)).float()
        return x, pending


# ---- decoding state -----------------------------------------------------------------------------
@dataclass
class InferenceCache:
    """Every layer's decoding state for a batch of sequences, and how many tokens each has seen.

    Mamba2 layers hold a fixed-size :class:`~arc.mamba2.MambaState`; attention layers a
    :class:`KVCache` with ``capacity`` slots per sequence.
    """

    layers: list[MambaState | KVCache]
    lengths: torch.Tensor  # (B,) long: tokens seen so far = the position of the next token
    capacity: int  # slots per sequence in the KV caches: the longest prompt + max_new_tokens
    tokens: torch.Tensor | None = None  # (B, capacity) every id fed so far, kept when align channels look back
    last_aligned: torch.Tensor | None = None  # (B, K) the last token's aligned ids, kept with map_agree / map_gate
    extended_aligned: torch.Tensor | None = None  # (B, T, K) an uncommitted extend's, with map_agree / map_gate
    map_counts: torch.Tensor | None = None  # (B, 2, N_MAPS) long: map_gate's counts up to the last token
    extended_counts: torch.Tensor | None = None  # (B, T, 2, N_MAPS) an uncommitted extend's, with map_gate

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])

    def select(self, index: torch.Tensor) -> InferenceCache:
        """Keep only the sequences ``index`` (LongTensor of batch positions, in the new order).
        Changes this cache in place and returns it, so ``cache = cache.select(i)`` and
        ``cache.select(i)`` both work."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.lengths.device)
        if index.dim() != 1:
            raise ValueError(f"InferenceCache.select: index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.batch_size):
            raise IndexError(f"InferenceCache.select: index out of range for a batch of {self.batch_size}")
        self.layers = [layer.select(index) for layer in self.layers]
        self.lengths = self.lengths.index_select(0, index)
        if self.tokens is not None:
            self.tokens = self.tokens.index_select(0, index)
        if self.last_aligned is not None:
            self.last_aligned = self.last_aligned.index_select(0, index)
        if self.extended_aligned is not None:
            self.extended_aligned = self.extended_aligned.index_select(0, index)
        if self.map_counts is not None:
            self.map_counts = self.map_counts.index_select(0, index)
        if self.extended_counts is not None:
            self.extended_counts = self.extended_counts.index_select(0, index)
        return self


# ---- the model ----------------------------------------------------------------------------------
# The prefill runs prompts of one length together, at most about this many tokens at a time (at
# least one prompt). On a CPU the Mamba2 layers' elementwise work (casts, the conv, the gated norm)
# is bound by memory traffic once a piece's activations outgrow the cache: one piece of many short
# prompts was 1.3x slower per token than the same prompts two at a time on an idle 2-core CPU,
# 1.6-1.8x with one thread beside another job; long prompts of one length ~even (docs/BENCHMARKS.md
# section 16). Each prompt's result is the same in a piece of any size, up to the rounding of the
# matrix multiplies (tests/test_model.py). On a GPU each length stays one piece, as before the split.
PREFILL_TOKENS = 2048


def piece_tokens(device: torch.device) -> int:
    """How many tokens an inference forward runs at a time on ``device`` (see PREFILL_TOKENS)."""
    return PREFILL_TOKENS if device.type == "cpu" else 1 << 62


class HybridLM(nn.Module):
    """Token embedding, ``n_layer`` blocks (kinds from ``cfg.layer_pattern``), final RMSNorm, output head."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.grid_pos:
            self.row_embedding = nn.Embedding(POS_SIZE, cfg.d_model)
            self.col_embedding = nn.Embedding(POS_SIZE, cfg.d_model)
            self.kind_embedding = nn.Embedding(N_KINDS, cfg.d_model)
        if cfg.align_input:  # the aligned input cell's id, or vocab_size for "no aligned cell"
            self.align_embedding = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
        if cfg.align_maps:  # one table per map, stacked: map k's rows start at k * (vocab_size + 1)
            self.map_embedding = nn.Embedding(N_MAPS * (cfg.vocab_size + 1), cfg.d_model)
        if cfg.map_agree:  # row k: "this cell agrees with align channel k" (the identity, then the maps)
            self.agree_embedding = nn.Embedding(1 + N_MAPS, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(kind, cfg, i) for i, kind in enumerate(cfg.layer_kinds))
        self.norm_f = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embedding.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter (the only place the model's init lives). L = n_layer.

        ================================  =====================================================
        parameter                         init
        ================================  =====================================================
        embedding.weight                  N(0, 0.02); also the output head when tied
        row/col/kind_embedding.weight     N(0, 0.02) (grid_pos)
        align_embedding.weight            N(0, 0.02) (align_input)
        map_embedding.weight              N(0, 0.02) (align_maps)
        agree_embedding.weight            N(0, 0.02) (map_agree)
        lm_head.weight (untied)           N(0, 0.02)
        \\*.norm.weight, norm2, norm_f     1 (RMSNorm; the Mamba2 gated norm too)
        attention mixer.in_proj.weight    N(0, 0.02)
        Mamba2 mixer.in_proj.weight       N(0, 0.02)
        mlp.fc1.weight                    N(0, 0.02)
        mixer.out_proj.weight, fc2        N(0, 0.02 / sqrt(2 L)): residual branches, GPT-2 scaling
        mixer.conv1d.weight, .bias        U(-1/sqrt(d_conv), 1/sqrt(d_conv)): nn.Conv1d's default
        mixer.dt_bias                     softplus^-1(dt), dt log-uniform in [1e-3, 1e-1], >= 1e-4
        mixer.A_log                       log(A), A uniform in [1, 16] per head
        mixer.D                           1
        ================================  =====================================================

        The last four rows are ``mamba_ssm``'s Mamba2 init; dt_bias, A_log and D are never decayed.
        """
        std = 0.02
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        nn.init.normal_(self.embedding.weight, 0.0, std)
        for name in ("row_embedding", "col_embedding", "kind_embedding", "align_embedding", "map_embedding",
                     "agree_embedding"):
            if hasattr(self, name):
                nn.init.normal_(getattr(self, name).weight, 0.0, std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        self.norm_f.weight.fill_(1.0)
        for block in self.layers:
            block.norm.weight.fill_(1.0)
            mixer = block.mixer
            nn.init.normal_(mixer.in_proj.weight, 0.0, std)
            nn.init.normal_(mixer.out_proj.weight, 0.0, residual_std)
            if isinstance(mixer, Mamba2):
                bound = 1.0 / math.sqrt(mixer.d_conv)
                nn.init.uniform_(mixer.conv1d.weight, -bound, bound)
                nn.init.uniform_(mixer.conv1d.bias, -bound, bound)
                mixer.dt_bias.copy_(init_dt_bias(mixer.nheads))
                mixer.A_log.copy_(init_A_log(mixer.nheads))
                mixer.D.fill_(1.0)
                mixer.norm.weight.fill_(1.0)
            if block.mlp is not None:
                block.norm2.weight.fill_(1.0)
                nn.init.normal_(block.mlp.fc1.weight, 0.0, std)
                nn.init.normal_(block.mlp.fc2.weight, 0.0, residual_std)

    # -- training -------------------------------------------------------------------------------
    def _check_ids(self, idx: torch.Tensor, what: str) -> None:
        if idx.dtype != torch.long:
            raise TypeError(f"HybridLM: {what} must be int64 token ids, got {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.cfg.vocab_size):
            raise ValueError(f"HybridLM: {what} has ids outside 0..{self.cfg.vocab_size - 1}")

    def _check_pos(self, pos: Any, shape: tuple[int, ...], what: str) -> None:
        """Positions are given when the config uses them, with shape (*shape, N_POS) (not checked for () )."""
        if not self.cfg.uses_positions:
            return
        if pos is None:
            raise ValueError(f"HybridLM: this model takes 2D positions (grid_pos={self.cfg.grid_pos}, align_input="
                             f"{self.cfg.align_input}, align_maps={self.cfg.align_maps}, rope={self.cfg.rope!r}, "
                             f"mamba_scan={self.cfg.mamba_scan!r}): pass "
                             f"{what} from arc.tokens")
        if shape and tuple(pos.shape) != (*shape, N_POS):
            raise ValueError(f"HybridLM: {what} must have shape {(*shape, N_POS)}, got {tuple(pos.shape)}")

    def embed(self, idx: torch.Tensor, pos: torch.Tensor | None, aligned: torch.Tensor | None,
              before: torch.Tensor | None = None, gate: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (...,) plus their 2D channels pos (..., N_POS) -> float32 input vectors (..., C).
        ``aligned`` (..., K): the ids of the input cells each token's :attr:`ModelConfig.align_channels`
        point at (vocab_size where there is none), needed only with align_input or align_maps;
        ``before`` (..., K): the previous token's ``aligned``, the cells this token's own slot reads
        (needed only with map_agree); ``gate`` (..., N_MAPS): each map's weight (:meth:`_gate`,
        needed only with map_gate)."""
        x = self.embedding(idx).float()  # (..., C)
        if self.cfg.grid_pos:
            x = x + self.row_embedding(pos[..., POS_ROW]) + self.col_embedding(pos[..., POS_COL]) \
                + self.kind_embedding(pos[..., POS_KIND])
        if self.cfg.align_input:
            x = x + self.align_embedding(aligned[..., 0])
        if self.cfg.align_maps:
            maps = aligned[..., -N_MAPS:] + self._map_rows  # (..., N_MAPS) rows of map_embedding
            weights = None if gate is None else gate.reshape(-1, N_MAPS)
            x = x + F.embedding_bag(maps.reshape(-1, N_MAPS), self.map_embedding.weight, mode="sum",
                                    per_sample_weights=weights).view(x.shape)
        if self.cfg.map_agree:  # before is vocab_size where nothing is read, which no id equals
            agree = (idx.unsqueeze(-1) == before).float()  # (..., K) 0/1 weights
            if gate is not None:  # the maps' rows (not the identity's) scaled like their embeddings
                agree = torch.cat([agree[..., :-N_MAPS], agree[..., -N_MAPS:] * gate], dim=-1)
            agree = agree.reshape(-1, before.shape[-1])  # (N, K)
            rows = torch.arange(agree.shape[1], device=agree.device).expand(agree.shape[0], -1)
            # a weighted embedding_bag, not a matmul: stays float32 under autocast, like the other tables
            x = x + F.embedding_bag(rows, self.agree_embedding.weight, mode="sum", per_sample_weights=agree).view(x.shape)
        return x

    def _before(self, aligned: torch.Tensor | None, first: torch.Tensor | None = None) -> torch.Tensor | None:
        """aligned (B, T, K) -> each token's predecessor's (B, T, K): ``first`` (B, K) before the first
        token (the cache's last, while decoding), none (vocab_size) at a sequence's start. None
        without map_agree and map_gate (aligned is then not read; with either, it is never None)."""
        if not self.cfg.reads_before:
            return None
        if first is None:
            first = torch.full_like(aligned[:, 0], self.cfg.vocab_size)
        return torch.cat([first[:, None], aligned[:, :-1]], dim=1)

    def _map_counts(self, idx: torch.Tensor, before: torch.Tensor, start: torch.Tensor | None = None) -> torch.Tensor | None:
        """map_gate's evidence. idx (B, T) with :meth:`_before`'s (B, T, K) -> (B, T, 2, N_MAPS) long:
        for each map, up to and including each token, [tokens whose id equals the cell their slot reads
        under the map, tokens whose slot reads a cell under it], plus ``start`` (B, 2, N_MAPS) (the
        cache's counts while decoding; zero at a sequence's start). None without map_gate."""
        if not self.cfg.map_gate:
            return None
        read = before[..., -N_MAPS:]  # (B, T, N_MAPS), vocab_size where nothing is read, which no id equals
        counts = torch.stack([idx.unsqueeze(-1) == read, read != self.cfg.vocab_size], dim=-2).long().cumsum(1)
        return counts if start is None else counts + start[:, None]

    def _gate(self, counts: torch.Tensor | None) -> torch.Tensor | None:
        """:meth:`_map_counts`' (..., 2, N_MAPS) -> each map's weight rate ** map_gate (..., N_MAPS)
        float32, rate = agreeing / reading (0 before any cell is read under the map)."""
        if counts is None:
            return None
        rate = counts[..., 0, :].float() / counts[..., 1, :].clamp(min=1).float()
        return rate.pow(self.cfg.map_gate)

    @property
    def _map_rows(self) -> torch.Tensor:
        """(N_MAPS,) where each map's table starts in map_embedding."""
        return torch.arange(N_MAPS, device=self.map_embedding.weight.device) * (self.cfg.vocab_size + 1)

    def _look_back(self, ids: torch.Tensor, at: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        """ids (B, S) of sequence slots, positions at (B, ...) and offsets back (B, ..., K) -> the ids
        ``back`` slots before ``at`` (B, ..., K), vocab_size where back is 0 (nothing aligned)."""
        source = (at.unsqueeze(-1) - back).clamp(min=0)
        found = ids.gather(1, source.flatten(1)).view(source.shape)
        return torch.where(back > 0, found, torch.full_like(found, self.cfg.vocab_size))

    def aligned_ids(self, idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor | None:
        """For a batch idx (B, T) with channels pos (B, T, N_POS): the ids the align channels point
        back to at each position, vocab_size where they are 0 (B, T, K). None without them."""
        channels = self.cfg.align_channels
        if not channels:
            return None
        at = torch.arange(idx.shape[1], device=idx.device).expand(idx.shape[0], -1)  # (B, T)
        return self._look_back(idx, at, pos[..., channels])

    def input_vectors(self, idx: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """A batch idx (B, T) with channels pos (B, T, N_POS) or None -> the first layer's input (B, T, C)."""
        return self._inputs(idx, pos)[0]

    def _inputs(self, idx: torch.Tensor, pos: torch.Tensor | None,
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """:meth:`input_vectors` (B, T, C), with what decoding goes on from: each token's aligned ids
        (B, T, K) (None without align channels) and map_gate's counts (B, T, 2, N_MAPS) (None without it)."""
        aligned = self.aligned_ids(idx, pos) if pos is not None else None  # (B, T, K)
        before = self._before(aligned)
        counts = self._map_counts(idx, before)
        return self.embed(idx, pos, aligned, before, self._gate(counts)), aligned, counts

    def _columns(self, pos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`arc.tokens.column_order` of pos (B, T, N_POS) when a Mamba2 layer scans by columns, else None."""
        return column_order(pos) if any(self.cfg.column_scans) else None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, pos: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) long, 2D channels pos (B, T, N_POS) (required when the config uses them) ->
        (logits (B, T, V), mean cross-entropy over targets != -100 or None without targets)."""
        if idx.dim() != 2:
            raise ValueError(f"HybridLM.forward: idx must be (B, T), got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"HybridLM.forward: sequence length {idx.shape[1]} > max_seq_len {self.cfg.max_seq_len}")
        self._check_pos(pos, tuple(idx.shape), "pos")
        x = self.drop(self.input_vectors(idx, pos))  # (B, T, C)
        columns = self._columns(pos)
        for block in self.layers:
            x, _ = block(x, pos=pos, columns=columns)
        logits = self.lm_head(self.norm_f(x))  # (B, T, V)
        if targets is None:
            return logits, None
        if targets.shape != idx.shape:
            raise ValueError(f"HybridLM.forward: targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}")
        return logits, mean_loss(logits, targets)

    def no_decay_names(self) -> set[str]:
        """Parameters trained without weight decay: vectors (norm weights, biases) and the SSM's
        ``A_log``, ``D``, ``dt_bias`` (marked ``_no_weight_decay`` as in mamba_ssm)."""
        return {name for name, p in self.named_parameters() if p.dim() < 2 or getattr(p, "_no_weight_decay", False)}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two optimizer groups: matrices with ``weight_decay``, everything in :meth:`no_decay_names` without."""
        skip = self.no_decay_names()
        named = list(self.named_parameters())
        return [{"params": [p for n, p in named if n not in skip], "weight_decay": weight_decay},
                {"params": [p for n, p in named if n in skip], "weight_decay": 0.0}]

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Number of parameters (a tied matrix counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding and not self.cfg.tie_embeddings:
            n -= self.embedding.weight.numel()
        return n

    def estimate_flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at ``seq_len`` (default max_seq_len), for MFU.

        6 per multiply-add of every matmul weight (projections, conv, output head; not the embedding
        lookup), plus per layer: attention ``12 * d_model * seq_len`` (QK^T and AV over the full
        length, the usual convention), Mamba2's chunked scan ``6 * (Q * (g*n + h*p) + 2*h*p*n)``
        (the full Q x Q chunk products, the chunk states and their read-out).
        """
        cfg = self.cfg
        t = cfg.max_seq_len if seq_len is None else seq_len
        flops = 6.0 * self.lm_head.weight.numel()
        for block in self.layers:
            flops += 6.0 * sum(p.numel() for n, p in block.named_parameters() if p.dim() >= 2)
            m = block.mixer
            if isinstance(m, Mamba2):
                flops += 6.0 * (m.chunk_size * (m.ngroups * m.d_state + m.d_inner) + 2 * m.d_inner * m.d_state)
            else:
                flops += 12.0 * cfg.d_model * t
        return flops

    # -- cached decoding ------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[torch.Tensor], max_new_tokens: int,
                positions: list[torch.Tensor] | None = None) -> tuple[InferenceCache, torch.Tensor]:
        """Run the prompts and return a batched decoding cache and the next-token logits (B, V) float32.

        Prompts (1-D LongTensors) may differ in length; those of equal length run together, about
        :data:`PREFILL_TOKENS` tokens at a time;
        ``positions[i]`` (L_i, N_POS) are prompt i's 2D channels (required when the config uses
        them). The cache holds each Mamba2 layer's final scan state and last d_conv-1 conv inputs,
        and each attention layer's keys and values in ``longest prompt + max_new_tokens`` slots per
        sequence.
        """
        if not prompts:
            raise ValueError("HybridLM.prefill: no prompts")
        if max_new_tokens < 0:
            raise ValueError(f"HybridLM.prefill: max_new_tokens must be >= 0, got {max_new_tokens}")
        device = self.embedding.weight.device
        prompts = [torch.as_tensor(p, device=device) for p in prompts]
        for i, p in enumerate(prompts):
            if p.dim() != 1 or p.numel() == 0:
                raise ValueError(f"HybridLM.prefill: prompt {i} must be a non-empty 1-D tensor, got shape {tuple(p.shape)}")
            self._check_ids(p, f"prompt {i}")
        if self.cfg.uses_positions:
            self._check_pos(positions, (), "positions (one (L, N_POS) tensor per prompt)")  # raises when None
            if len(positions) != len(prompts):
                raise ValueError(f"HybridLM.prefill: {len(prompts)} prompts but {len(positions)} position tensors")
            positions = [torch.as_tensor(q, dtype=torch.long, device=device) for q in positions]
            for i, (p, q) in enumerate(zip(prompts, positions)):
                self._check_pos(q, (len(p),), f"positions[{i}]")
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        capacity = int(lengths.max()) + max_new_tokens
        if capacity > self.cfg.max_seq_len:
            raise ValueError(f"HybridLM.prefill: longest prompt {int(lengths.max())} + max_new_tokens {max_new_tokens} "
                             f"> max_seq_len {self.cfg.max_seq_len}")
        batch = len(prompts)
        layers: list[MambaState | KVCache | None] = [None] * len(self.layers)
        logits = torch.empty(batch, self.cfg.vocab_size, device=device)
        tokens = None
        if self.cfg.align_channels:  # the align channels look back at earlier ids while decoding
            tokens = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        last = None  # with map_agree / map_gate: the last token's aligned ids, what the next token's slot reads
        if self.cfg.reads_before:
            last = torch.zeros(batch, len(self.cfg.align_channels), dtype=torch.long, device=device)
        counts = None  # with map_gate: its counts over each whole prompt
        if self.cfg.map_gate:
            counts = torch.zeros(batch, 2, N_MAPS, dtype=torch.long, device=device)
        pieces = []  # (rows of one length, at most about PREFILL_TOKENS tokens together)
        for length in sorted(set(lengths.tolist())):
            same = torch.nonzero(lengths == length).squeeze(1)  # batch positions of this length
            pieces += list(same.split(max(1, piece_tokens(device) // length)))
        for rows in pieces:
            length = len(prompts[int(rows[0])])
            idx = torch.stack([prompts[i] for i in rows.tolist()])  # (G, L)
            pos = torch.stack([positions[i] for i in rows.tolist()]) if self.cfg.uses_positions else None  # (G, L, N_POS)
            x, aligned, prompt_counts = self._inputs(idx, pos)  # (G, L, C), (G, L, K), (G, L, 2, N_MAPS)
            columns = self._columns(pos)  # a column scan's state is its state after the whole prompt in its order
            for li, block in enumerate(self.layers):
                x, state = block(x, return_state=True, pos=pos, columns=columns)
                if layers[li] is None:  # allocate the batched state on first sight of its dtype
                    layers[li] = _empty_like_state(state, batch, capacity)
                _put_state(layers[li], state, rows)
            logits[rows] = self._next_logits(x[:, -1])  # (G, V)
            if tokens is not None:
                tokens[rows, :length] = idx
            if last is not None:  # the ids the last token's align channels point at
                last[rows] = aligned[:, -1]
            if counts is not None:  # map_gate's counts over the whole prompt
                counts[rows] = prompt_counts[:, -1]
        return InferenceCache(layers, lengths, capacity, tokens, last, map_counts=counts), logits

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, cache: InferenceCache, pos: torch.Tensor | None = None) -> torch.Tensor:
        """Feed one token per sequence (B,), with its 2D channels pos (B, N_POS) when the config uses
        them, and return the next-token logits (B, V) float32.

        Mamba2 layers cost the same per token whatever the prompt length; attention layers read the
        sequence's filled slots. ``cache`` is advanced in place. Tokens fed here are read as written,
        so under ``mamba_scan`` "c" they must not be input-grid tokens (decoding writes output grids;
        a prompt's input grids go through :meth:`prefill`)."""
        if tokens.shape != (cache.batch_size,):
            raise ValueError(f"HybridLM.step: tokens must have shape ({cache.batch_size},), got {tuple(tokens.shape)}")
        if cache.batch_size == 0:  # every sequence was dropped by select
            return torch.empty(0, self.cfg.vocab_size, device=tokens.device)
        self._check_ids(tokens, "tokens")
        self._check_pos(pos, (cache.batch_size,), "pos")
        longest = int(cache.lengths.max())  # one device sync per step, shared by every attention layer
        if longest >= cache.capacity:
            raise ValueError(f"HybridLM.step: the cache is full ({cache.capacity} tokens); prefill with a larger max_new_tokens")
        aligned = None
        if cache.tokens is not None:
            rows = torch.arange(cache.batch_size, device=tokens.device)
            cache.tokens[rows, cache.lengths] = tokens
            aligned = self._look_back(cache.tokens, cache.lengths, pos[:, self.cfg.align_channels])  # (B, K)
        counts = None
        if cache.map_counts is not None:  # (B, 2, N_MAPS) with this token's
            counts = self._map_counts(tokens[:, None], cache.last_aligned[:, None], cache.map_counts)[:, 0]
            cache.map_counts = counts
        x = self.embed(tokens, pos, aligned, cache.last_aligned, self._gate(counts))  # (B, C)
        if cache.last_aligned is not None:
            cache.last_aligned = aligned
        for block, state in zip(self.layers, cache.layers):
            x = block.step(x, state, cache.lengths, pos, used=longest + 1)
        cache.lengths = cache.lengths + 1
        return self._next_logits(x)  # (B, V)

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor, cache: InferenceCache, pos: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, list[MambaPending | MambaPendingFused | None]]:
        """Feed T tokens per sequence (B, T) at once, with their 2D channels pos (B, T, N_POS) when the
        config uses them, and return the logits after each (B, T, V) float32 and what :meth:`commit`
        needs. Nothing is kept until :meth:`commit` says how many of each sequence's tokens to keep:
        a speculative decoder's verification of drafted tokens, reading the attention caches once
        for all T. ``extend`` then ``commit(cache, pending, T - 1)`` leaves the cache as T calls of
        :meth:`step` would, with the same logits (up to rounding)."""
        if tokens.dim() != 2 or tokens.shape[0] != cache.batch_size or tokens.shape[1] < 1:
            raise ValueError(f"HybridLM.extend: tokens must have shape ({cache.batch_size}, T >= 1), got {tuple(tokens.shape)}")
        self._check_ids(tokens, "tokens")
        self._check_pos(pos, tuple(tokens.shape), "pos")
        t = tokens.shape[1]
        longest = int(cache.lengths.max())
        if longest + t > cache.capacity:
            raise ValueError(f"HybridLM.extend: {t} tokens after {longest} do not fit the cache's {cache.capacity} slots")
        aligned = None
        if cache.tokens is not None:
            rows = torch.arange(cache.batch_size, device=tokens.device)[:, None]
            where = cache.lengths[:, None] + torch.arange(t, device=tokens.device)  # (B, T)
            cache.tokens[rows, where] = tokens
            aligned = self._look_back(cache.tokens, where, pos[..., self.cfg.align_channels])  # (B, T, K)
        before = self._before(aligned, cache.last_aligned)
        counts = None if cache.map_counts is None else self._map_counts(tokens, before, cache.map_counts)
        x = self.embed(tokens, pos, aligned, before, self._gate(counts))
        if cache.last_aligned is not None:
            cache.extended_aligned = aligned  # commit keeps the last kept token's
        if counts is not None:
            cache.extended_counts = counts  # (B, T, 2, N_MAPS), likewise
        pending = []
        for block, state in zip(self.layers, cache.layers):
            x, p = block.extend(x, state, cache.lengths, pos, used=longest + t)
            pending.append(p)
        return self._next_logits(x), pending  # (B, T, V)

    @torch.no_grad()
    def commit(self, cache: InferenceCache, pending: list[MambaPending | MambaPendingFused | None], last: torch.Tensor) -> None:
        """Keep tokens 0..last[i] (B,) of sequence i from the :meth:`extend` that returned ``pending``."""
        for p, state in zip(pending, cache.layers):
            if p is not None:
                p.commit(state, last)
        rows = torch.arange(cache.batch_size, device=last.device)
        if cache.last_aligned is not None:
            cache.last_aligned, cache.extended_aligned = cache.extended_aligned[rows, last], None
        if cache.map_counts is not None:
            cache.map_counts, cache.extended_counts = cache.extended_counts[rows, last], None
        cache.lengths = cache.lengths + last + 1

    def _next_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding's next-token logits from the last residual x (B, C): the final norm and the head in
        float32 even under autocast, so that the argmax between two near-equal logits does not hang on
        bf16's rounding of the last product (the head is V x C, a negligible share of a step)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.lm_head(self.norm_f(x).float())  # (B, V) float32


def _empty_like_state(state: MambaState | KVCache, batch: int, capacity: int) -> MambaState | KVCache:
    """A zero batched state shaped like one group's state, with ``capacity`` slots for KV caches."""
    if isinstance(state, MambaState):
        return MambaState(state.conv.new_zeros(batch, *state.conv.shape[1:]), state.ssm.new_zeros(batch, *state.ssm.shape[1:]))
    b, h, _, hd = state.k.shape
    return KVCache(state.k.new_zeros(batch, h, capacity, hd), state.v.new_zeros(batch, h, capacity, hd))


def _put_state(into: MambaState | KVCache, state: MambaState | KVCache, rows: torch.Tensor) -> None:
    """Copy one group's state into batch positions ``rows`` of the batched state."""
    if isinstance(into, MambaState):
        into.conv[rows] = state.conv.to(into.conv.dtype)
        into.ssm[rows] = state.ssm.to(into.ssm.dtype)
    else:
        length = state.k.shape[2]
        into.k[rows, :, :length] = state.k.to(into.k.dtype)
        into.v[rows, :, :length] = state.v.to(into.v.dtype)

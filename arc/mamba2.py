"""The Mamba2 mixer, with the exact parameter names, shapes and initialisation of
``mamba_ssm.modules.mamba2.Mamba2`` (version 2.3.2, defaults: rmsnorm=True, norm_before_gate=False,
D_has_hdim=False, d_ssm=None, bias=False, conv_bias=True), so a state dict moves between this module,
its kernel path and ``mamba_ssm``'s own module in both directions.

Parameters (d_inner = expand * d_model, nheads = d_inner / headdim, conv_dim = d_inner + 2*ngroups*d_state)::

    in_proj.weight   (2*d_inner + 2*ngroups*d_state + nheads, d_model)   rows in the order [z, x, B, C, dt]
    conv1d.weight    (conv_dim, 1, d_conv)     depthwise, causal, over [x, B, C]
    conv1d.bias      (conv_dim,)
    dt_bias          (nheads,)                 softplus^-1 of the initial step size
    A_log            (nheads,)                 A = -exp(A_log)
    D                (nheads,)                 skip connection
    norm.weight      (d_inner,)                gated RMSNorm, one group of d_inner / ngroups per B/C group
    out_proj.weight  (d_model, d_inner)

The compute (conv, scan, decoding steps) goes through :mod:`arc.kernels`, which picks the fused
kernels or the pure-PyTorch twin; this module never decides that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from arc import cpu_scan, kernels


@dataclass
class MambaState:
    """A Mamba2 layer's decoding state for a batch: constant size whatever the prompt length."""

    conv: torch.Tensor  # (B, conv_dim, d_conv - 1) the last inputs of the conv, oldest first
    ssm: torch.Tensor  # (B, nheads, headdim, d_state) float32

    def select(self, index: torch.Tensor) -> MambaState:
        return MambaState(self.conv.index_select(0, index), self.ssm.index_select(0, index))


@dataclass
class MambaPending:
    """What :meth:`Mamba2.extend` read, kept until the decoder knows how many tokens it keeps."""

    window: torch.Tensor  # (B, d_conv - 1 + T, conv_dim) the conv's previous inputs, then the T tokens'
    cum: torch.Tensor  # (B, T, h) cumulative log decay from the entering state
    dt: torch.Tensor  # (B, T, h) step sizes after softplus
    x: torch.Tensor  # (B, T, h, p)
    B: torch.Tensor  # (B, T, h, n)

    def commit(self, state: MambaState, last: torch.Tensor) -> None:
        """Move ``state`` (the one extend started from) past tokens 0..last[i] of sequence i, in place:
        exactly the scan's recurrence, summed in closed form over the kept tokens."""
        b, t, h = self.cum.shape
        p, n = self.x.shape[-1], self.B.shape[-1]
        kept = torch.arange(t, device=last.device)[None, :, None] <= last[:, None, None]  # (B, T, 1)
        at_last = self.cum.gather(1, last[:, None, None].expand(-1, 1, h))  # (B, 1, h)
        decay = torch.exp(torch.where(kept, at_last - self.cum, torch.zeros_like(self.cum)))
        weight = torch.where(kept, decay * self.dt, torch.zeros_like(self.dt))  # (B, T, h)
        wx = (weight[..., None] * self.x).permute(0, 2, 3, 1).reshape(b * h, p, t)  # (B*h, p, T)
        ssm = state.ssm.view(b * h, p, n)  # the state, updated in place: decayed, then the kept inputs added
        ssm.mul_(torch.exp(at_last[:, 0]).to(ssm.dtype).reshape(b * h, 1, 1))
        ssm.baddbmm_(wx.to(ssm.dtype), self.B.permute(0, 2, 1, 3).reshape(b * h, t, n).to(ssm.dtype))
        w1 = state.conv.shape[-1]
        index = last[:, None] + 1 + torch.arange(w1, device=last.device)  # the w1 inputs ending at token last
        conv = self.window.gather(1, index[..., None].expand(-1, -1, self.window.shape[-1]))  # (B, w1, conv_dim)
        state.conv.copy_(conv.transpose(1, 2))


@dataclass
class MambaPendingFused:
    """:class:`MambaPending` of the C++ path (:func:`arc.cpu_scan.mixer_extend`): the T tokens' in_proj
    outputs, run again through the fused steps for the tokens kept."""

    zxbcdt: torch.Tensor  # (B, T, d_in_proj) in the states' dtype
    mixer: Mamba2

    def commit(self, state: MambaState, last: torch.Tensor) -> None:
        """Move ``state`` past tokens 0..last[i] of sequence i, in place: exactly those steps."""
        cpu_scan.mixer_commit_(self.zxbcdt, state.conv, state.ssm, *self.mixer.fused_weights(), last + 1)


def init_dt_bias(nheads: int, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_init_floor: float = 1e-4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``mamba_ssm``'s dt init: dt log-uniform in [dt_min, dt_max], floored at dt_init_floor, stored as
    softplus^-1(dt) so that softplus(dt_bias) = dt. Returns (nheads,) float32."""
    u = torch.rand(nheads, generator=generator)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus^-1(dt) = log(exp(dt) - 1), written stably


def init_A_log(nheads: int, low: float = 1.0, high: float = 16.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """``mamba_ssm``'s A init: A uniform in [low, high] per head, stored as log(A). Returns (nheads,) float32."""
    if not 0 < low <= high:
        raise ValueError(f"A init range must satisfy 0 < low <= high, got ({low}, {high})")
    return torch.log(torch.empty(nheads).uniform_(low, high, generator=generator))


class GatedRMSNorm(nn.Module):
    """``norm(x * silu(z)) * weight`` over groups of ``group_size`` channels (mamba_ssm's RMSNormGated
    with norm_before_gate=False). One parameter, ``weight`` (d,)."""

    def __init__(self, d: int, eps: float = 1e-5, group_size: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.group_size = d if group_size is None else group_size
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return kernels.gated_rmsnorm(x, z, self.weight, self.eps, self.group_size)


class Mamba2(nn.Module):
    """The Mamba2 mixer: (B, L, d_model) -> (B, L, d_model), plus prefill and one-token steps."""

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 ngroups: int = 1, chunk_size: int = 256, layer_idx: int | None = None) -> None:
        super().__init__()
        if d_conv < 2:
            raise ValueError(f"Mamba2: d_conv must be >= 2, got {d_conv}")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2: expand * d_model = {d_inner} is not a multiple of headdim {headdim}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: nheads = {nheads} is not a multiple of ngroups {ngroups}")
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.headdim, self.ngroups, self.chunk_size, self.layer_idx = headdim, ngroups, chunk_size, layer_idx
        self.d_inner, self.nheads = d_inner, nheads
        self.conv_dim = d_inner + 2 * ngroups * d_state

        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=False)  # [z, x, B, C, dt]
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, bias=True)
        self.dt_bias = nn.Parameter(torch.empty(nheads))
        self.A_log = nn.Parameter(torch.empty(nheads))
        self.D = nn.Parameter(torch.empty(nheads))
        self.norm = GatedRMSNorm(d_inner, eps=1e-5, group_size=d_inner // ngroups)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True  # the same marker mamba_ssm sets; see HybridLM.param_groups
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's init for a standalone mixer (HybridLM.init_weights re-initialises the projections)."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():
            self.dt_bias.copy_(init_dt_bias(self.nheads))
            self.A_log.copy_(init_A_log(self.nheads))
            self.D.fill_(1.0)
            self.norm.weight.fill_(1.0)

    def _split(self, zxbcdt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[z, xBC, dt] from the in_proj output (..., d_in_proj)."""
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)

    def forward(self, u: torch.Tensor, return_state: bool = False) -> tuple[torch.Tensor, MambaState | None]:
        """u (B, L, d_model) -> (y (B, L, d_model), the state after the last token if return_state else None)."""
        b, l, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        z, xBC, dt = self._split(self.in_proj(u))  # (B, L, d_inner), (B, L, conv_dim), (B, L, nheads)
        conv_state = None
        if return_state:  # the conv's last d_conv-1 inputs, zeros in front of a prompt shorter than that
            w1 = self.d_conv - 1
            conv_state = F.pad(xBC.transpose(1, 2), (max(w1 - l, 0), 0))[..., -w1:].float().contiguous()  # (B, conv_dim, w1)
        xBC = kernels.causal_conv1d(xBC, self.conv1d.weight, self.conv1d.bias)  # (B, L, conv_dim)
        x, B, C = torch.split(xBC, [self.d_inner, g * n, g * n], dim=-1)
        A = -torch.exp(self.A_log.float())  # (h,)
        y, ssm_state = kernels.ssd(x.reshape(b, l, h, p), dt, A, B.reshape(b, l, g, n), C.reshape(b, l, g, n),
                                   self.D, self.dt_bias, self.chunk_size, return_state=return_state)  # (B, L, h, p)
        y = self.norm(y.reshape(b, l, self.d_inner), z)  # (B, L, d_inner)
        out = self.out_proj(y)  # (B, L, d_model)
        return out, (MambaState(conv_state, ssm_state.float()) if return_state else None)

    def extend(self, u: torch.Tensor, state: MambaState) -> tuple[torch.Tensor, MambaPending | MambaPendingFused]:
        """T tokens per sequence after ``state``, which is left as it is: u (B, T, d_model) ->
        (y (B, T, d_model), what :meth:`MambaPending.commit` needs to move the state past the first
        tokens of each sequence). The speculative decoder's verification pass: y[:, t] equals what
        T calls of :meth:`step` would give. Where the step is one C++ call (:func:`arc.kernels.fused_step_ok`)
        the T steps run in one call on copies of the states, and committing runs the kept ones again
        on the states; elsewhere (under autograd, without the C++ extension, on a GPU, states not
        contiguous float32/64 of one dtype) the scan is written out for one short chunk (in float32 or wider)."""
        b, t, _ = u.shape
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(u)  # (B, T, d_in_proj)
        if kernels.fused_step_ok(zxbcdt, state.conv, state.ssm):  # CPU: T fused steps on copies of the states
            dtype, zxbcdt = zxbcdt.dtype, zxbcdt.to(state.ssm.dtype).contiguous()
            y = cpu_scan.mixer_extend(zxbcdt, state.conv, state.ssm, *self.fused_weights())  # (B, T, d_inner), states' dtype
            return self.out_proj(y.to(dtype)), MambaPendingFused(zxbcdt, self)  # as step: out_proj in in_proj's dtype
        z, xBC, dt = self._split(zxbcdt)  # (B, T, d_inner), (B, T, conv_dim), (B, T, h)
        with torch.autocast(device_type=u.device.type, enabled=False):
            wide = torch.promote_types(u.dtype, torch.float32)
            w1 = self.d_conv - 1
            window = torch.cat([state.conv.transpose(1, 2).to(wide), xBC.to(wide)], dim=1)  # (B, w1 + T, conv_dim)
            conv = kernels.causal_conv1d_ref(window, self.conv1d.weight.to(wide), self.conv1d.bias.to(wide))[:, w1:]
            x, B, C = torch.split(conv, [self.d_inner, g * n, g * n], dim=-1)  # the T tokens' conv outputs
            x = x.reshape(b, t, h, p)
            B = B.reshape(b, t, g, n).repeat_interleave(h // g, dim=2)  # (B, T, h, n)
            C = C.reshape(b, t, g, n).repeat_interleave(h // g, dim=2)
            dt = F.softplus(dt.to(wide) + self.dt_bias.to(wide))  # (B, T, h)
            A = -torch.exp(self.A_log.float()).to(wide)  # (h,) as forward and step compute it
            cum = torch.cumsum(dt * A, dim=1)  # (B, T, h) log decay since the state
            # from the entering state: exp(cum_t) C_t . s
            y = torch.einsum("bhpn,bthn->bthp", state.ssm.to(wide), C) * torch.exp(cum)[..., None]
            # within the T tokens: sum over s <= t of exp(cum_t - cum_s) dt_s (C_t . B_s) x_s
            gap = cum.transpose(1, 2)[..., :, None] - cum.transpose(1, 2)[..., None, :]  # (B, h, T, S)
            causal = torch.ones(t, t, dtype=torch.bool, device=u.device).tril()
            weights = torch.exp(gap.masked_fill(~causal, -math.inf)) * dt.transpose(1, 2)[:, :, None, :]
            weights = weights * torch.einsum("bthn,bshn->bhts", C, B)
            y = y + torch.einsum("bhts,bshp->bthp", weights, x) + self.D.to(wide)[:, None] * x  # (B, T, h, p)
        y = self.norm(y.reshape(b, t, self.d_inner).to(z.dtype), z)  # (B, T, d_inner)
        return self.out_proj(y), MambaPending(window, cum, dt, x, B)

    def fused_weights(self) -> tuple:
        """What the C++ decoding steps (arc.cpu_scan.mixer_step_ / mixer_extend / mixer_commit_) take
        after the in_proj output and the two states: conv weight and bias, A, D, dt_bias, the norm's
        weight, groups, eps."""
        return (self.conv1d.weight, self.conv1d.bias, -torch.exp(self.A_log.float()), self.D, self.dt_bias,
                self.norm.weight, self.ngroups, self.norm.eps)

    def allocate_state(self, batch: int, device: torch.device | str) -> MambaState:
        """A zero state, as before any token."""
        return MambaState(torch.zeros(batch, self.conv_dim, self.d_conv - 1, device=device),
                          torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device))

    def step(self, u: torch.Tensor, state: MambaState) -> torch.Tensor:
        """One token per sequence: u (B, d_model) -> (B, d_model); ``state`` is updated in place.
        Costs the same whatever the number of tokens already seen."""
        b = u.shape[0]
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        zxbcdt = self.in_proj(u)  # (B, d_in_proj)
        if kernels.fused_step_ok(zxbcdt, state.conv, state.ssm):  # CPU: everything up to out_proj in one call
            y = cpu_scan.mixer_step_(zxbcdt, state.conv, state.ssm, *self.fused_weights())  # (B, d_inner) float32
            return self.out_proj(y.to(zxbcdt.dtype))  # (B, d_model)
        z, xBC, dt = self._split(zxbcdt)  # (B, d_inner), (B, conv_dim), (B, nheads)
        xBC = kernels.conv_step(xBC, state.conv, self.conv1d.weight, self.conv1d.bias)  # (B, conv_dim)
        x, B, C = torch.split(xBC, [self.d_inner, g * n, g * n], dim=-1)
        A = -torch.exp(self.A_log.float())  # (h,)
        y = kernels.ssd_step(state.ssm, x.reshape(b, h, p), dt, A, B.reshape(b, g, n), C.reshape(b, g, n),
                             self.D, self.dt_bias)  # (B, h, p)
        y = self.norm(y.reshape(b, self.d_inner).to(z.dtype), z)  # (B, d_inner)
        return self.out_proj(y)  # (B, d_model)

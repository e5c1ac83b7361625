"""The training objective: next-token loss, V3's multi-token-prediction loss, and the balancing terms.

Balancing schemes (each can be switched on from the CLI; defaults follow each paper):
  expert    expert-level auxiliary loss (DeepSeekMoE section 4.2; V2 section 2.2.3, alpha_1)
  mixtral   Switch-style loss as transformers computes it for Mixtral (router_aux_loss_coef)
  device    V2 device-level loss over `devices` equal expert groups (alpha_2)
  comm      V2 communication loss, a token reaching at most `max_devices` of them (alpha_3)
  seq       V3 complementary sequence-wise loss (alpha, 1e-4 in the paper)
  aux_free  V3 auxiliary-loss-free balancing: per-expert bias b_i += gamma * sign(mean load - load_i),
            applied after each optimizer step, used for expert selection only
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..model import MoE, Transformer
from . import balance

SCHEMES = ("expert", "mixtral", "device", "comm", "seq", "aux_free")


@dataclass
class BalanceSettings:
    schemes: tuple[str, ...] = ()
    expert_alpha: float = 0.003
    mixtral_coef: float = 0.02
    device_alpha: float = 0.05
    comm_alpha: float = 0.02
    seq_alpha: float = 1e-4
    bias_gamma: float = 0.001
    devices: int = 1  # simulated devices (expert-parallel ranks) for the device / comm losses
    max_devices: int = 1  # M: devices a token may reach (device-limited routing)

    def __post_init__(self) -> None:
        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown:
            raise ValueError(f"--balance: unknown scheme {unknown[0]!r}; choose from {', '.join(SCHEMES)}")

    @classmethod
    def paper_defaults(cls, config: ModelConfig, **overrides) -> "BalanceSettings":
        """What each paper trained with: V1 expert-level; V2 expert + device + communication with
        devices = n_group and M = topk_group and the paper's alpha_1 = 0.003 (the Hub config.json says 0.001);
        V3 auxiliary-loss-free plus the sequence-wise loss; Mixtral the Switch-style loss. Other coefficients
        from the config where it has them."""
        if config.model_type in ("deepseek_v3", "deepseek_v32", "deepseek_v4"):  # V4: its routed layers
            base = dict(schemes=("aux_free", "seq"))
        elif config.model_type == "mixtral":
            base = dict(schemes=("mixtral",), mixtral_coef=config.router_aux_loss_coef or 0.02)
        elif config.model_type == "deepseek_v2" and (config.n_group or 1) > 1:
            base = dict(schemes=("expert", "device", "comm"), devices=config.n_group,
                        max_devices=config.topk_group or 1, expert_alpha=0.003)
        else:
            base = dict(schemes=("expert",), expert_alpha=config.aux_loss_alpha or 0.001)
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    def check_model(self, config: ModelConfig) -> None:
        """Fail before the first step (ValueError naming the flag) when the device / comm losses cannot
        group this model's experts into --devices equal parts."""
        if config.is_moe and {"device", "comm"} & set(self.schemes) and config.n_routed_experts % self.devices:
            raise ValueError(f"--devices {self.devices} must divide the model's {config.n_routed_experts} routed "
                             "experts (the device and comm losses group them into equal devices)")


@dataclass
class StepLosses:
    total: torch.Tensor
    lm: torch.Tensor
    mtp: torch.Tensor | None = None
    balance: dict[str, torch.Tensor] = field(default_factory=dict)

    def as_floats(self) -> dict[str, float]:
        out = {"loss": float(self.total.detach()), "lm_loss": float(self.lm.detach())}
        if self.mtp is not None:
            out["mtp_loss"] = float(self.mtp.detach())
        out.update({f"{name}_loss": float(v.detach()) for name, v in self.balance.items()})
        return out


def compute_losses(model: Transformer, tokens: torch.Tensor, seq_len: int, settings: BalanceSettings,
                   mtp_weight: float) -> StepLosses:
    """tokens (B, T + 1 + D): inputs are the first T, depth-k MTP labels reach k + 1 tokens ahead.

    L = CE + mtp_weight / D * sum_k CE_k + balance terms (V3 eq. 25 for the MTP part).
    """
    T = seq_len
    inputs = tokens[:, :T]
    v4 = model.config.model_type == "deepseek_v4"  # V4's MTP reads the hyper-connected streams (B, T, N, D)
    h = model.streams(inputs) if v4 else model.hidden_states(inputs)  # (B, T, [N,] D)
    out = model.head(model.norm(model.hc_head(h))) if v4 else model.head(h)
    lm = F.cross_entropy(out.float().flatten(0, 1), tokens[:, 1:T + 1].flatten())
    total = lm
    mtp = None
    if model.mtp:
        depth_losses = []
        for k in range(1, len(model.mtp) + 1):
            h = model.mtp_hidden(k - 1, h, tokens[:, k:T + k])  # inputs t_{i+k}, predicts t_{i+k+1}
            logits = model.mtp_logits(k - 1, h) if v4 else model.head(model.mtp[k - 1].norm(h)).float()
            depth_losses.append(F.cross_entropy(logits.flatten(0, 1), tokens[:, k + 1:T + k + 1].flatten()))
        mtp = torch.stack(depth_losses).mean()
        total = total + mtp_weight * mtp
    terms = balance_terms(model.moe_layers(include_mtp=True), settings, inputs.shape[0], T)
    for value in terms.values():
        total = total + value
    return StepLosses(total, lm, mtp, terms)


def balance_terms(layers: list[MoE], settings: BalanceSettings, batch: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Each enabled loss summed over the MoE layers (as the papers sum per-layer terms)."""
    terms: dict[str, torch.Tensor] = {}
    needs_scores = bool(set(settings.schemes) - {"aux_free"})  # every loss but the bias update reads them
    for moe in layers:
        r = moe.last_routing
        if needs_scores and r.scores is None:
            raise ValueError("balance losses need the router scores of the last forward: run it in train mode "
                             "or with autograd enabled")
        E, K = moe.gate.n_experts, moe.gate.top_k
        values = {}
        if "expert" in settings.schemes:
            values["expert"] = balance.expert_balance_loss(r.scores, r.indices, E, K, settings.expert_alpha)
        if "device" in settings.schemes:
            values["device"] = balance.device_balance_loss(r.scores, r.indices, E, K, settings.devices,
                                                           settings.device_alpha)
        if "comm" in settings.schemes:
            values["comm"] = balance.communication_balance_loss(r.scores, r.indices, E, K, settings.devices,
                                                                settings.max_devices, settings.comm_alpha)
        if "seq" in settings.schemes:
            values["seq"] = balance.sequence_balance_loss(r.scores, r.indices, batch, seq_len, E, K,
                                                          settings.seq_alpha)
        for name, value in values.items():
            terms[name] = terms[name] + value if name in terms else value
    if "mixtral" in settings.schemes and layers:
        # transformers pools every layer's routing into one Switch-style term rather than summing per layer
        routes = [moe.last_routing for moe in layers]
        terms["mixtral"] = balance.mixtral_balance_loss([r.logits for r in routes], [r.indices for r in routes],
                                                        layers[0].gate.n_experts, layers[0].gate.top_k,
                                                        settings.mixtral_coef)
    return terms


@torch.no_grad()
def dropped_fraction(layers: list[MoE]) -> float:
    """Share of (token, slot) pairs that token dropping removed in the last forward, over `layers`."""
    masks = [moe.last_routing.keep for moe in layers if moe.last_routing.keep is not None]
    if not masks:
        return 0.0
    return 1.0 - float(sum(m.sum() for m in masks)) / sum(m.numel() for m in masks)


@torch.no_grad()
def expert_loads(layers: list[MoE]) -> list[torch.Tensor]:
    """Tokens routed to each expert in the last forward, per MoE layer: (E,) float tensors."""
    return [balance.expert_load(moe.last_routing.indices, moe.gate.n_experts).float() for moe in layers]


@torch.no_grad()
def update_biases(layers: list[MoE], loads: list[torch.Tensor], gamma: float) -> None:
    for moe, load in zip(layers, loads, strict=True):
        if moe.gate.bias is None:
            raise ValueError("--balance aux_free needs routers with a correction bias (topk_method noaux_tc)")
        balance.update_routing_bias(moe.gate.bias, load, gamma)

"""Make timm backbones trainable with Opacus DP-SGD, and say what was changed.

Three things stop a stock timm model from being made private:

* BatchNorm mixes samples of a batch, so one image's gradient depends on the others. Every BatchNorm becomes
  GroupNorm; timm's fused ``BatchNormAct2d`` (EfficientNet, MobileNet, DenseNet, InceptionV3) passes Opacus'
  ``ModuleValidator`` because its exact type is not registered, then fails inside ``make_private`` — it becomes
  timm's ``GroupNormAct`` with the same activation and drop modules, and a per-sample gradient rule
  (registered below) so Opacus does not fall back to slow functorch for it.
* In-place operations on the output of a hooked layer break Opacus' backward hooks (Opacus issue #828):
  activations get ``inplace=False`` and timm ResNet blocks (``x += shortcut``) get an out-of-place subclass.
* Parameters that live directly on a module whose ``forward`` is never called get no per-sample gradient:
  ViT's class token and position embedding sit on the VisionTransformer, whose ``forward_features`` the
  classifier calls. They move into a small ``TokenEmbed`` module with an exact per-sample gradient rule.

``check_private`` then proves the result on a dry run (make_private + one backward on a tiny batch), so a
model that still cannot be trained privately fails before training with the offending layer named.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from opacus.grad_sample.utils import get_gsm_class
from opacus.validators import ModuleValidator
from timm.layers import GroupNormAct
from timm.models.resnet import BasicBlock, Bottleneck
from timm.models.vision_transformer import VisionTransformer
from timm.models.xception import Block as XceptionBlock
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bloodfl.errors import BloodflError
from bloodfl.privacy.norms import ghost_norm_samplers, hooks_grad_samplers


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return ``model`` made fit for Opacus (changed in place, or a fixed copy), and one human-readable line
    per kind of change."""
    _check_padding_modes(model)
    changes: list[str] = []
    changes += _replace_batchnorm(model)
    changes += _disable_inplace(model)
    changes += _out_of_place_residuals(model)
    changes += _wrap_vit_tokens(model)
    if ModuleValidator.validate(model, strict=False):
        # anything else Opacus knows how to fix (LSTM -> DPLSTM, MultiheadAttention -> DPMultiheadAttention);
        # its fix returns a copy, which is why callers must use the returned model
        before = Counter(type(m).__name__ for m in model.modules())
        model = ModuleValidator.fix(model)
        after = Counter(type(m).__name__ for m in model.modules())
        changes += [f"Opacus replaced {n} {name}" for name, n in (before - after).items()]
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise BloodflError(f"model cannot be trained with DP: {_first_line(errors[0])}; use another model "
                           "or dp=false")
    return model, changes


def _check_padding_modes(model: nn.Module) -> None:
    """Conv2d with any padding mode has an exact per-sample rule (norms.py); Conv1d/Conv3d only with zeros."""
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv1d, nn.Conv3d)) and m.padding_mode != "zeros":
            raise BloodflError(f"layer {name!r} ({type(m).__name__}, padding_mode={m.padding_mode!r}) has no exact "
                               "per-sample gradient rule under DP; use padding_mode='zeros', another model or dp=false")


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0][:300]


def _group_count(channels: int) -> int:
    # Opacus' own BatchNorm -> GroupNorm rule (32 groups, Wu & He 2018), kept so both paths agree
    return math.gcd(32, channels)


def _to_group_norm(bn: _BatchNorm) -> nn.Module:
    """GroupNorm (with bn's activation and drop if it is a fused timm norm+act), keeping bn's affine params."""
    channels = bn.num_features
    if hasattr(bn, "act") and hasattr(bn, "drop"):
        gn: nn.GroupNorm = GroupNormAct(channels, num_groups=_group_count(channels), eps=bn.eps,
                                        affine=bn.affine, apply_act=False)
        gn.act, gn.drop = bn.act, bn.drop
    else:
        gn = nn.GroupNorm(_group_count(channels), channels, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        # keeps timm's zero-init of the last norm in residual blocks, and pretrained scales/shifts
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    return gn


def _replace_batchnorm(model: nn.Module) -> list[str]:
    counts: Counter[str] = Counter()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _BatchNorm):
                if not isinstance(getattr(child, "drop", nn.Identity()), nn.Identity):
                    raise BloodflError(f"layer {name!r} ({type(child).__name__}) has a random drop inside its "
                                       "norm, which DP cannot clip per sample; use another model or dp=false")
                new = _to_group_norm(child)
                counts[f"{type(child).__name__} -> {type(new).__name__}"] += 1
                setattr(parent, name, new)
    return [f"replaced {n} {kind} (batch statistics mix samples; affine weights kept)"
            for kind, n in counts.items()]


def _disable_inplace(model: nn.Module) -> list[str]:
    counts: Counter[str] = Counter()
    for m in model.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            counts[type(m).__name__] += 1
    return [f"set inplace=False on {n} {name}" for name, n in counts.items()]


def _add_shortcut(block: BasicBlock | Bottleneck, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """The end of timm's ResNet blocks (SE, drop path, downsampled shortcut), with an out-of-place add."""
    if block.se is not None:
        x = block.se(x)
    if block.drop_path is not None:
        x = block.drop_path(x)
    if block.downsample is not None:
        shortcut = block.downsample(shortcut)
    return x + shortcut


class OutOfPlaceBasicBlock(BasicBlock):
    """timm's ResNet BasicBlock with ``x = x + shortcut`` instead of ``x += shortcut`` (Opacus #828)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.drop_block(self.bn1(self.conv1(x))))
        x = self.bn2(self.conv2(self.aa(x)))
        return self.act2(_add_shortcut(self, x, shortcut))


class OutOfPlaceBottleneck(Bottleneck):
    """timm's ResNet Bottleneck with an out-of-place residual add (Opacus #828)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.drop_block(self.bn2(self.conv2(x))))
        x = self.bn3(self.conv3(self.aa(x)))
        return self.act3(_add_shortcut(self, x, shortcut))


class OutOfPlaceXceptionBlock(XceptionBlock):
    """timm's legacy Xception block with an out-of-place residual add (``x += skip`` breaks Opacus' hooks)."""

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x = self.rep(inp)
        skip = self.skipbn(self.skip(inp)) if self.skip is not None else inp
        return x + skip


_OUT_OF_PLACE = {BasicBlock: OutOfPlaceBasicBlock, Bottleneck: OutOfPlaceBottleneck,
                 XceptionBlock: OutOfPlaceXceptionBlock}


def _out_of_place_residuals(model: nn.Module) -> list[str]:
    counts: Counter[str] = Counter()
    for m in model.modules():
        replacement = _OUT_OF_PLACE.get(type(m))
        if replacement is not None:
            m.__class__ = replacement  # same parameters and state-dict keys, only forward differs
            counts[replacement.__bases__[0].__name__] += 1
    return [f"made the residual add out-of-place in {n} {name}" for name, n in counts.items()]


class TokenEmbed(nn.Module):
    """ViT's prefix tokens and absolute position embedding, as a module Opacus can hook."""

    def __init__(self, cls_token: nn.Parameter | None, reg_token: nn.Parameter | None,
                 pos_embed: nn.Parameter | None, no_embed_class: bool) -> None:
        super().__init__()
        self.cls_token, self.reg_token, self.pos_embed = cls_token, reg_token, pos_embed
        self.no_embed_class = no_embed_class

    def _prefix(self, batch: int) -> list[torch.Tensor]:
        return [t.expand(batch, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prefix = self._prefix(x.shape[0])
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed  # deit-3 style: position embedding only on patch tokens
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        return x


@register_grad_sampler(TokenEmbed)
def _token_embed_grad_sample(layer: TokenEmbed, activations: list[torch.Tensor],
                             backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    # the output is tokens + parameters, so each sample's gradient is its slice of the output gradient
    grads: dict[nn.Parameter, torch.Tensor] = {}
    start = 0
    for token in (layer.cls_token, layer.reg_token):
        if token is not None:
            n = token.shape[1]
            if token.requires_grad:
                grads[token] = backprops[:, None, start:start + n]
            start += n
    pos = layer.pos_embed
    if pos is not None and pos.requires_grad:
        grads[pos] = backprops[:, None, start:] if layer.no_embed_class else backprops[:, None]
    return grads


class DPVisionTransformer(VisionTransformer):
    """timm's VisionTransformer whose tokens and position embedding live in ``self.token_embed``."""

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.token_embed(x.reshape(x.shape[0], -1, x.shape[-1])))


def _wrap_vit_tokens(model: nn.Module) -> list[str]:
    count = 0
    for m in model.modules():
        if type(m) is not VisionTransformer:
            continue
        if m.dynamic_img_size:
            raise BloodflError("ViT with dynamic_img_size cannot be made private; build it with a fixed image size")
        m.token_embed = TokenEmbed(m.cls_token, m.reg_token, m.pos_embed, m.no_embed_class)
        m.cls_token = m.reg_token = m.pos_embed = None  # now owned (and state-dict keyed) by token_embed
        m.__class__ = DPVisionTransformer
        count += 1
    return [f"moved class token and position embedding of {count} ViT into a hookable TokenEmbed"] if count else []


@register_grad_sampler(GroupNormAct)
def _group_norm_act_grad_sample(layer: GroupNormAct, activations: list[torch.Tensor],
                                backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of a GroupNorm followed by an activation (the hook sees the activation's output)."""
    normed = F.group_norm(activations[0], layer.num_groups, eps=layer.eps)
    if not isinstance(layer.act, nn.Identity):
        # chain the output gradient back through the (elementwise) activation to the affine output
        shape = (1, -1) + (1,) * (normed.dim() - 2)
        pre = normed
        if layer.weight is not None:  # affine
            pre = normed * layer.weight.detach().view(shape) + layer.bias.detach().view(shape)
        with torch.enable_grad():
            pre = pre.detach().requires_grad_()
            (backprops,) = torch.autograd.grad(layer.act(pre), pre, backprops)
    grads: dict[nn.Parameter, torch.Tensor] = {}
    if layer.weight is not None and layer.weight.requires_grad:
        grads[layer.weight] = torch.einsum("ni...->ni", normed * backprops)
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = torch.einsum("ni...->ni", backprops)
    return grads


def check_private(model: nn.Module, input_shape: tuple[int, ...], grad_sample_mode: str = "hooks") -> None:
    """Dry run on a copy: attach Opacus hooks, run one backward on 2 random samples, and check that every
    trainable parameter got a per-sample gradient. Raises BloodflError naming the offending layer."""
    probe = copy.deepcopy(model).train()
    _check_no_buffers(probe)
    kwargs = {"max_grad_norm": 1.0} if grad_sample_mode == "ghost" else {}
    try:
        gsm = get_gsm_class(grad_sample_mode)(probe, batch_first=True, loss_reduction="sum", **kwargs)
    except NotImplementedError as exc:  # Opacus reports unsupported layers as a list of errors
        raise BloodflError(f"model cannot be trained with DP: {_first_line(exc)}; use another model or "
                           "dp=false") from exc
    gsm.GRAD_SAMPLERS = hooks_grad_samplers()  # the rules PrivateTraining uses
    if grad_sample_mode == "ghost":
        gsm.NORM_SAMPLERS = ghost_norm_samplers()
    stack: list[str] = []  # the layers whose forward is running: on an error, the last one is the culprit
    ran: set[str] = set()

    def enter(name: str) -> None:
        stack.append(name)
        ran.add(name)

    handles = [h for name, m in probe.named_modules() for h in (
        m.register_forward_pre_hook(lambda *_, n=name: enter(n)),
        m.register_forward_hook(lambda *_: None if stack.pop() else None))]  # a hook's result replaces outputs
    try:
        x = torch.randn(2, *input_shape, requires_grad=grad_sample_mode == "ghost")
        loss = gsm(x).float().square().sum()
        if grad_sample_mode == "ghost":  # as PrivateTraining's first pass: the input's gradient only
            (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
            if grad is None:
                raise BloodflError("ghost clipping needs the loss to depend on the input image through autograd, "
                                   "and this model's first stage is computed without gradients (fixed features); "
                                   "use dp.grad_sample_mode=hooks")
        else:
            loss.backward()
    except RuntimeError as exc:
        where = f"layer {stack[-1]!r} ({type(probe.get_submodule(stack[-1])).__name__})" if stack else "a layer"
        raise BloodflError(f"{where} fails under DP's per-sample hooks ({_first_line(exc)[:160]}): it probably "
                           "modifies a tensor in place; use another model or dp=false") from exc
    finally:
        for h in handles:
            h.remove()
        gsm.remove_hooks()
    attr = "_norm_sample" if grad_sample_mode == "ghost" else "grad_sample"
    missing = [n for n, p in probe.named_parameters() if p.requires_grad and getattr(p, attr, None) is None]
    if missing:
        # parameters held directly by a module whose forward() never ran (e.g. a backbone used through
        # forward_features) get no per-sample gradient; Opacus then loses the others too, so name those first
        owners = [n.rpartition(".")[0] for n in missing]
        culprits = [n for n, o in zip(missing, owners) if o not in ran] or missing
        owner = culprits[0].rpartition(".")[0]
        raise BloodflError(f"DP cannot compute per-sample gradients of {', '.join(culprits[:3])}: they belong to "
                           f"{owner!r} ({type(probe.get_submodule(owner)).__name__}), whose forward() is not "
                           "called; move them into a submodule, freeze them, or use another model")


def _check_no_buffers(model: nn.Module) -> None:
    """Opacus' strict rule, with a readable message: a trainable layer must not keep running statistics."""
    for name, m in model.named_modules():
        trainable = any(p.requires_grad for p in m.parameters(recurse=False))
        if trainable and any(True for _ in m.buffers(recurse=False)):
            raise BloodflError(f"layer {name!r} ({type(m).__name__}) keeps running statistics across samples, "
                               "which DP-SGD cannot train; make_dp_compatible replaces the known ones (BatchNorm); "
                               "use another model or dp=false")

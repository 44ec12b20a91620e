"""Read what one attention module computes without changing it: the module's attention runs through
a function registered with transformers' ``AttentionInterface`` (its documented plugin point), which
shows the post-rotary queries and keys to an observer, then calls the model's own implementation.

Only the tapped module sees the registered name (it gets its own copy of the config), so the model's
masks and every other layer are as they were; :meth:`Patch.undo` puts the config back.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable

from torch import Tensor, nn

from ..core.errors import ConfigError
from .state import Patch

TAP_NAME = "staprune_tap"  # the attention implementation a tapped module runs
TAP_ATTR = "_staprune_tap"  # on the tapped module: (observer, the implementation it had)
READABLE = ("eager", "sdpa")  # implementations whose inputs are whole (B, H, L, d) queries and keys

# observer(module, query (B, H, Lq, d), key (B, h, Lk, d), mask or None, scaling)
Observer = Callable[[nn.Module, Tensor, Tensor, "Tensor | None", float], None]


def tap_attention(p: Patch, attention: nn.Module, observe: Observer, what: str) -> None:
    """Show ``observe`` every call of ``attention``'s attention function until ``p`` is undone.

    Args:
        what: who reads it, for the error (``"fastv"``, ``"visionzip"``).
    Raises:
        ConfigError: the module has no config, or runs an implementation whose inputs are not whole
            queries and keys (FlashAttention's packed sequences).
    """
    config = getattr(attention, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation not in READABLE:
        raise ConfigError(f"{what} reads attention weights, which attn_implementation={implementation!r} does not "
                          "give here; load the model with attn_implementation='sdpa'")
    from transformers import AttentionInterface

    AttentionInterface.register(TAP_NAME, _tapped)
    own = copy.copy(config)
    own._attn_implementation = TAP_NAME
    p.set_attribute(attention, "config", own)
    p.set_attribute(attention, TAP_ATTR, (observe, implementation))


def _stock_attention(module: nn.Module, implementation: str) -> Callable:
    if implementation == "eager":  # each transformers model module defines its own
        return sys.modules[type(module).__module__].eager_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[implementation]


def _tapped(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
            *args, **kwargs):
    observe, implementation = getattr(module, TAP_ATTR)
    scaling = kwargs.get("scaling", args[0] if args else None)
    observe(module, query, key, attention_mask, query.shape[-1] ** -0.5 if scaling is None else scaling)
    return _stock_attention(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)


__all__ = ["READABLE", "TAP_NAME", "tap_attention"]

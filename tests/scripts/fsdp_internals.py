"""Test-only: FSDP2's parameter groups of a module, across the torches shardtune supports (private attributes: one
`_fsdp_param_group` in torch 2.11, a list `_fsdp_param_groups` since 2.12)."""

from __future__ import annotations


def param_groups(module) -> list:
    state = module._get_fsdp_state()
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:
        groups = [] if state._fsdp_param_group is None else [state._fsdp_param_group]
    return list(groups)

"""Access policies: who may reach which instruments, with what, for how long.

Pure and default-deny: no trio, no sockets, no clock (a request carries its
time). A policy is the rules of a directory of TOML files, checked from
their bytes (:func:`load_policy_files`, errors naming file, rule and key;
``relay/policy_files.py`` reads them); :func:`decide`
answers one :class:`AccessRequest` with a :class:`Decision`: allowed or not,
the rules that applied, and the session's :class:`Limits`, each the most
restrictive of the rules and of the broker's own :class:`Ceiling`.
``policies/default/`` is the policy a broker uses when it is given none.
docs/policies.md is the reference for people writing policies.
"""

from pathlib import Path
from typing import Final

from policies.channels import ChannelSet, ChannelSyntaxError, parse_channel
from policies.decide import Ceiling, decide
from policies.load import PolicyError, load_policy_files
from policies.model import (
    AccessRequest,
    Decision,
    Denial,
    Device,
    Effect,
    Engineer,
    Limits,
    Policy,
    Rule,
)
from policies.windows import TimeWindow

#: The policy shipped with the package (``policies/default/``).
DEFAULT_POLICY_DIR: Final = Path(__file__).resolve().parent / "default"

__all__ = [
    "DEFAULT_POLICY_DIR",
    "AccessRequest",
    "Ceiling",
    "ChannelSet",
    "ChannelSyntaxError",
    "Decision",
    "Denial",
    "Device",
    "Effect",
    "Engineer",
    "Limits",
    "Policy",
    "PolicyError",
    "Rule",
    "TimeWindow",
    "decide",
    "load_policy_files",
    "parse_channel",
]

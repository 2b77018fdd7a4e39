"""``python -m megatron_coe.compat``: the installed megatron-core and the registry table."""

from megatron_coe.compat import registry
from megatron_coe.compat.versions import TESTED_RANGE, version_string

print(f"megatron-core {version_string()} (tested range {TESTED_RANGE})")
print(registry.describe())

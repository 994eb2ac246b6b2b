"""The private library internals polydistill relies on still behave as it needs (pyproject bounds them too)."""

from __future__ import annotations

import pytest

import polydistill
from polydistill import hookimpl
from polydistill.plugins import PluginHost


class Boom:
    @hookimpl
    def regularize(self, student, state):
        raise ValueError("oops")


def test_pluggy_hook_implementations_can_be_wrapped():
    """PluginHost rewrites each HookImpl.function to name the plugin and hook of an exception."""
    host = PluginHost.from_config({"kd": False}, [("boom", Boom())])
    (impl,) = host.pm.hook.regularize.get_hookimpls()
    assert impl.function.__wrapped__.__name__ == "regularize"  # our guard around the plugin's method
    with pytest.raises(polydistill.PluginError, match="plugin 'boom' failed in hook 'regularize': ValueError: oops"):
        host.pm.hook.regularize(student=None, state=None)


def test_accelerate_state_can_be_reset_for_another_precision_in_one_process():
    """Each Trainer resets accelerate's process-wide singletons so runs in one process differ in precision."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from polydistill.build import fresh_accelerate_state as _fresh_accelerate_state

    _fresh_accelerate_state()
    assert Accelerator(mixed_precision="no").mixed_precision == "no"
    _fresh_accelerate_state()
    assert Accelerator(mixed_precision="bf16").mixed_precision == "bf16"
    _fresh_accelerate_state()
    assert AcceleratorState._shared_state == {}  # the next Accelerator chooses afresh
